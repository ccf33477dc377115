"""Langue2Gloss: vocabulary round trips, shapes, beam 1 == greedy, and learning a toy text -> gloss mapping
from text tokens and from audio-like state sequences."""
from __future__ import annotations

import pytest
import torch

from avcache.train.models.langue2gloss import (BOS, EOS, PAD, UNK, Langue2Gloss, Langue2GlossConfig, Vocabulary,
                                        pad_batch)


def test_vocabulary_is_deterministic_and_round_trips():
    vocab = Vocabulary.build([["DOG", "RUN"], ["DOG", "PARK"], ["CAT"]])
    assert vocab.tokens[4:] == ["DOG", "CAT", "PARK", "RUN"]  # by count, then alphabetically
    ids = vocab.encode(["DOG", "ZEBRA", "RUN"], max_len=10)
    assert ids == [BOS, 4, UNK, 7, EOS]
    assert vocab.decode(ids) == ["DOG", "<unk>", "RUN"]
    assert vocab.encode(["DOG"] * 20, max_len=5) == [BOS, 4, 4, 4, EOS]
    assert pad_batch([[1, 2], [3]]).tolist() == [[1, 2], [3, PAD]]


def toy_task(n=64, seed=0):
    """Source sentence: words w_i in 'noise' function words; gloss: the content words in order."""
    g = torch.Generator().manual_seed(seed)
    content, function = [f"w{i}" for i in range(8)], ["the", "a", "of"]
    sources, glosses = [], []
    for _ in range(n):
        words = [content[int(i)] for i in torch.randint(0, 8, (3,), generator=g)]
        sentence = []
        for w in words:
            sentence += [function[int(torch.randint(0, 3, (1,), generator=g))], w]
        sources.append(sentence)
        glosses.append([w.upper() for w in words])
    return sources, glosses


@pytest.mark.parametrize("source", ["text", "audio"])
def test_learns_a_toy_gloss_mapping_and_beam_one_is_greedy(source):
    torch.manual_seed(0)
    sources, glosses = toy_task()
    text_vocab, gloss_vocab = Vocabulary.build(sources), Vocabulary.build(glosses)
    targets = pad_batch([gloss_vocab.encode(g, 8) for g in glosses])
    src = pad_batch([text_vocab.encode(s, 16, bos_eos=False) for s in sources])
    mask = src != PAD
    if source == "audio":  # each token becomes two noisy frames of a fixed random vector: a stand-in for speech
        table = torch.randn(len(text_vocab), 24)
        src = table[src].repeat_interleave(2, dim=1) + 0.05 * torch.randn(src.shape[0], src.shape[1] * 2, 24)
        mask = mask.repeat_interleave(2, dim=1)
    cfg = Langue2GlossConfig(gloss_vocab=len(gloss_vocab), source=source, text_vocab=len(text_vocab),
                             audio_dim=24, audio_stride=2, width=64, dropout=0.0)
    model = Langue2Gloss(cfg)
    assert model(src, mask, targets).shape == (64, targets.shape[1] - 1, len(gloss_vocab))

    def exact():
        model.eval()
        return sum(gloss_vocab.decode(p) == g for p, g in zip(model.greedy(src, mask, 8), glosses)) / len(glosses)

    before = exact()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        model.train()
        loss = model.loss(src, mask, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = exact()
    assert before < 0.1 and after >= 0.8, (before, after)
    model.eval()
    assert model.beam(src[:8], mask[:8], beam_size=1, max_len=8) == model.greedy(src[:8], mask[:8], 8)
    assert [gloss_vocab.decode(p) for p in model.beam(src[:8], mask[:8], beam_size=4, max_len=8)] \
        == [gloss_vocab.decode(p) for p in model.greedy(src[:8], mask[:8], 8)]  # a well-trained toy: same answer


def test_config_errors():
    with pytest.raises(ValueError, match="source must be"):
        Langue2GlossConfig(gloss_vocab=10, source="video")
    with pytest.raises(ValueError, match="needs audio_dim"):
        Langue2GlossConfig(gloss_vocab=10, source="audio")
