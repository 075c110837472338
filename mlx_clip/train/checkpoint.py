"""Resumable checkpoints: trainable parameters, optimizer state and data position, written atomically.

The MLX RNG needs no saving: the loop reseeds it from (seed, step) before every step.

Layout: RUN_DIR/checkpoints/step-00000100/{trainable.safetensors, optimizer.safetensors, state.json} and, for losses
with state of their own (a negative bank), loss_state.safetensors. Frozen weights
are not copied: a resumed run rebuilds the model from the same base (`--model`) and overlays what trained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

_NAME = re.compile(r"^step-(\d{8})$")
LOSS_STATE = "loss_state.safetensors"


def checkpoint_dirs(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a crash mid-write leaves only a hidden temp dir, never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(run_dir, resume: str) -> Path | None:
    """'latest' -> newest checkpoint of run_dir (None when there is none yet), else the given dir (must exist)."""
    if not resume:
        return None
    if resume == "latest":
        dirs = checkpoint_dirs(run_dir)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint dir (no state.json)")
    return path


def save_checkpoint(run_dir, step: int, model, optimizer, state: dict, keep_last: int = 2,
                    loss_state: dict[str, mx.array] | None = None) -> Path:
    """Write checkpoint `step` beside its final name, rename it into place, then prune to the newest `keep_last`.
    `loss_state`: arrays a loss keeps between steps (a negative bank), saved in the same atomic rename."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        if loss_state:
            mx.save_safetensors(str(tmp / LOSS_STATE), loss_state)
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore trainable parameters and optimizer state in place; return state.json."""
    path = Path(path)
    trainable = mx.load(str(path / "trainable.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(trainable) != expected:
        diff = sorted(set(trainable) ^ expected)[:10]
        raise ValueError(f"{path}: trainable parameters differ from this run's model/options (e.g. {', '.join(diff)}); "
                         "resume with the same --model, locking and LoRA options")
    model.update(tree_unflatten(list(trainable.items())))
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    optimizer.init(model.trainable_parameters())  # marks it initialised; existing entries are kept
    return json.loads((path / "state.json").read_text())


def load_loss_state(path) -> dict[str, mx.array] | None:
    """The loss's saved arrays (a negative bank), or None when the checkpoint has none."""
    file = Path(path) / LOSS_STATE
    return mx.load(str(file)) if file.exists() else None
