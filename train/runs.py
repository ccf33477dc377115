"""A run directory: resolved config, metrics (JSON lines + TensorBoard), checkpoints (safetensors), plots.

    RUN/config.yaml        the resolved config (what a resumed run must match)
    RUN/metrics.jsonl      one JSON object per evaluation (epoch, losses, validation metrics)
    RUN/tensorboard/       the same scalars for TensorBoard
    RUN/last.safetensors   weights after the last finished epoch; RUN/last_state.pt: optimiser, RNG, epoch
    RUN/best.safetensors   weights of the best validation epoch
    RUN/results.json       final test metrics, flat name -> number
    RUN/*.png              curves
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_model, save_model

from avcache.features.durable import replace_atomically, write_json_atomic
from avcache.pipeline.config import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """`train.device`: auto (the GPU when there is one: a Ray task given a GPU share sees exactly that one),
    cpu, cuda or cuda:<n>."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:<n>, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but torch sees no GPU here; use auto or cpu")
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class RunDir:
    def __init__(self, path: str | Path, config) -> None:
        self.path = Path(path)
        self.config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        self._tensorboard = None

    # -- config and resumption ----------------------------------------------------------------------------

    def start(self, resumable_keys: tuple[str, ...] = ("train.epochs",)) -> dict | None:
        """Write the config; return the saved training state when this directory holds a run of the same config
        (keys in `resumable_keys` may differ: more epochs continue a run). A different config is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        saved_path = self.path / "config.yaml"
        state = None
        if saved_path.is_file() and (self.path / "last_state.pt").is_file():
            saved = yaml.safe_load(saved_path.read_text())
            differences = config_differences(saved, self.config, ignore=resumable_keys)
            if differences:
                raise ConfigError(f"{self.path} holds a run with another config ({'; '.join(differences[:5])}); "
                                  f"use a new RUN directory, or delete this one to start over")
            # on the CPU: the RNG state must be, and load_state_dict moves the rest to the model's device
            state = torch.load(self.path / "last_state.pt", weights_only=False, map_location="cpu")
        else:  # nothing to resume: what an earlier, unfinished first epoch left behind would mislead
            for name in ("metrics.jsonl", "best.safetensors", "last.safetensors", "results.json"):
                (self.path / name).unlink(missing_ok=True)
        replace_atomically(saved_path, lambda tmp: tmp.write_text(yaml.safe_dump(self.config, sort_keys=False)))
        return state

    # -- metrics ------------------------------------------------------------------------------------------

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def history(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_history(self, last_step: int) -> None:
        """Drop records past the resumed checkpoint (an epoch that ran but whose checkpoint never landed)."""
        kept = [r for r in self.history() if r["step"] <= last_step]
        replace_atomically(self.path / "metrics.jsonl",
                           lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write_results(self, results: dict) -> None:
        write_json_atomic(self.path / "results.json", {k: _plain(v) for k, v in results.items()})

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()

    # -- checkpoints --------------------------------------------------------------------------------------

    def save_weights(self, name: str, model: torch.nn.Module, metadata: dict | None = None) -> Path:
        # save_model stores tied weights (BART's shared embeddings) once; load_model ties them again.
        path = self.path / f"{name}.safetensors"
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        replace_atomically(path, lambda tmp: save_model(model, str(tmp), metadata=meta, force_contiguous=True))
        return path

    def resume(self, state: dict | None, model: torch.nn.Module, optimiser: torch.optim.Optimizer) -> tuple[int, float]:
        """Load what `start()` returned into the model and optimiser; -> (last finished epoch, best score)."""
        if state is None:
            return 0, -float("inf")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["torch_rng"])  # dropout continues exactly where the interrupted run stopped
        self.truncate_history(state["epoch"])
        return state["epoch"], state["best"]

    def end_epoch(self, epoch: int, score: float, best: float, model: torch.nn.Module,
                  optimiser: torch.optim.Optimizer) -> float:
        """Save best (when `score` beats `best`) and last weights, then the state to resume from; -> new best.
        The state goes last: a run killed before it resumes from the previous epoch and redoes this one."""
        if score > best:
            best = score
            self.save_weights("best", model, {"epoch": epoch, "score": score})
        self.save_weights("last", model, {"epoch": epoch})
        self.save_state({"epoch": epoch, "best": best, "model": model.state_dict(),
                         "optimiser": optimiser.state_dict(), "torch_rng": torch.get_rng_state()})
        return best

    def save_state(self, state: dict) -> None:
        replace_atomically(self.path / "last_state.pt", lambda tmp: torch.save(state, tmp))

    def load_best(self, model: torch.nn.Module) -> None:
        """Load the best weights into `model`; with no epoch run at all, the model as it is becomes the best."""
        if not (self.path / "best.safetensors").is_file():
            self.save_weights("best", model, {"epoch": 0})
        self.load_weights("best", model)

    def load_weights(self, name: str, model: torch.nn.Module) -> None:
        path = self.path / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {path}")
        load_model(model, str(path), strict=True)

    # -- plots --------------------------------------------------------------------------------------------

    def plot(self, filename: str, series: dict[str, list[tuple[int, float]]], ylabel: str, title: str) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for label, points in series.items():
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = self.path / filename
        fig.savefig(path, dpi=110)
        return path


def _plain(value):
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value


def config_differences(saved, current, ignore=(), prefix="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if name not in ignore:
                out += config_differences(saved.get(key), current.get(key), ignore, name)
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} -> {current!r}"]
