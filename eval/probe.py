"""Classification on frozen features: a linear probe (multinomial logistic regression) and zero-shot matching."""
from __future__ import annotations

import numpy as np
import torch


def linear_probe_accuracy(train_x, train_y, test_x, test_y, n_classes: int, seed: int = 0, steps: int = 300,
                          lr: float = 0.05, weight_decay: float = 1e-3) -> float:
    """Full-batch Adam on standardised features with a fixed recipe, so the score is a property of the features."""
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(train_x), dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    head = torch.nn.Linear(x.shape[1], n_classes)
    optimiser = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(head((x - mean) / std), y).backward()
        optimiser.step()
    with torch.no_grad():
        predicted = head((torch.as_tensor(np.asarray(test_x), dtype=torch.float32) - mean) / std).argmax(1)
    return float((predicted.numpy() == np.asarray(test_y)).mean())


def zero_shot_accuracy(embeddings, labels, class_embeddings) -> float:
    """Nearest class embedding by cosine similarity; (N, D), (N,) class indices, (C, D)."""
    a = np.asarray(embeddings, np.float32)
    c = np.asarray(class_embeddings, np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return float(((a @ c.T).argmax(1) == np.asarray(labels)).mean())
