"""Loading the public checkpoints strictly, with messages that name the file and what is wrong.

Both public files are ``torch.save`` dicts: FOMM's ``vox-cpk.pth.tar`` holds ``generator`` and ``kp_detector``
(plus ``discriminator``, ``optimizer_*`` and ``epoch``), the face-vid2vid reimplementation's
``00000189-checkpoint.pth.tar`` holds ``generator``, ``kp_detector`` and ``he_estimator`` (plus discriminator and
optimizer states). Only the network entries are read; the others are ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ophav_core.errors import OphavError


class CheckpointError(OphavError):
    """A checkpoint file exists but is not in the expected public format."""


def read_checkpoint(path: str | Path, required: tuple[str, ...], what: str) -> dict[str, dict[str, torch.Tensor]]:
    """The ``required`` state dicts of the checkpoint at ``path`` (tensors on the CPU).

    what: the file's public name, for messages (``vox-cpk.pth.tar``)."""
    from ophav_core.errors import UnreadableCheckpoint
    from ophav_core.weights import load_tensors

    path = Path(path)
    try:
        data = load_tensors(path, what=f"the {what} checkpoint")
    except UnreadableCheckpoint as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not the {what} checkpoint: expected a dict with keys "
                              f"{', '.join(required)}, found a {type(data).__name__}")
    missing = [key for key in required if key not in data]
    if missing:
        found = ", ".join(sorted(map(str, data))[:12]) or "nothing"
        raise CheckpointError(f"{path} is not the {what} checkpoint: missing key {', '.join(repr(m) for m in missing)} "
                              f"(needs {', '.join(required)}; found {found})")
    for key in required:
        if not isinstance(data[key], dict) or not all(isinstance(v, torch.Tensor) for v in data[key].values()):
            raise CheckpointError(f"{path}: entry {key!r} of the {what} checkpoint is not a state dict of tensors")
    return {key: data[key] for key in required}


def _fill_batchnorm_counters(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints written before PyTorch 0.4.1 lack BatchNorm's ``num_batches_tracked`` (a training counter,
    unused at inference); add zeros so that the strict load checks only what matters."""
    state = dict(state)
    for name, buffer in module.named_buffers():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = torch.zeros_like(buffer)
    return state


def describe_mismatch(module: nn.Module, state: dict[str, torch.Tensor], limit: int = 4) -> str:
    """'' when ``state`` fits ``module`` exactly, else a short account of missing, unexpected and misshapen keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape (file vs network)", shapes)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_strict(modules: dict[str, nn.Module], states: dict[str, dict[str, Any]], path: str | Path, what: str) -> None:
    """Load each ``states[key]`` into ``modules[key]`` with ``strict=True``; a mismatch names the file and keys."""
    for key, module in modules.items():
        state = _fill_batchnorm_counters(module, states[key])
        problem = describe_mismatch(module, state)
        if problem:
            raise CheckpointError(f"{path}: {key!r} does not match the {what} network ({problem}). Is this the "
                                  f"right file, and do the model_params match the config it was trained with?")
        module.load_state_dict(state, strict=True)
