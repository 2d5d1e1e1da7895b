"""Safe, strict loading of public checkpoints with messages that name the file and the fix.

Files are read with ``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so
loading never runs code from the file. A file in the wrong format (another network's checkpoint, a truncated
download, a pickle with code in it) raises :class:`WeightsInvalid` naming the file, what was found and how
to get the right one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ophav_core.errors import OphavError
from ophav_core.weights import WeightFile


class WeightsInvalid(OphavError):
    """A weights file exists but is not the expected checkpoint."""


def fix_hint(weight: WeightFile) -> str:
    return (f"Get {weight.filename} from {weight.url} and run `ophav weights add {weight.name} "
            f"/path/to/{weight.filename}`, or point the `checkpoint` option at the right file")


def read_checkpoint(path: Path, weight: WeightFile) -> Any:
    """The unpickled content of ``path`` (tensors and containers only; see :func:`ophav_core.weights.load_tensors`)."""
    from ophav_core.errors import UnreadableCheckpoint
    from ophav_core.weights import load_tensors

    try:
        return load_tensors(path, what=f"a plain weights file for {weight.filename}")
    except UnreadableCheckpoint as exc:
        raise WeightsInvalid(f"{exc}. {fix_hint(weight)}") from None


def describe(obj: Any) -> str:
    """A short account of what a checkpoint holds, for error messages."""
    if isinstance(obj, dict):
        keys = list(obj)
        tensors = sum(1 for v in obj.values() if _is_tensor(v))
        if keys and tensors == len(keys):
            return f"a raw state dict of {len(keys)} tensors (first keys: {', '.join(map(str, keys[:3]))})"
        return f"a dict with keys {[str(k) for k in keys[:8]]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def extract_state_dict(obj: Any, path: Path, weight: WeightFile, wrapper: str | None,
                       fallbacks: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state dict inside ``obj``: ``obj[wrapper]`` (or the first present of ``fallbacks``), or ``obj``
    itself when ``wrapper`` is None (a raw state dict)."""
    if not isinstance(obj, dict):
        raise WeightsInvalid(f"{path} holds {describe(obj)}, not {weight.description or weight.filename}. "
                             f"{fix_hint(weight)}")
    if wrapper is not None:
        for key in (wrapper, *fallbacks):
            if key in obj:
                obj = obj[key]
                break
        else:
            raise WeightsInvalid(f"{path} has no {wrapper!r} entry: it holds {describe(obj)}, but {weight.filename} "
                                 f"is {weight.description or 'a wrapped state dict'}. {fix_hint(weight)}")
    if not isinstance(obj, dict) or not all(_is_tensor(v) for v in obj.values()):
        raise WeightsInvalid(f"{path} does not hold a state dict of tensors where {weight.filename} has one "
                             f"(found {describe(obj)}). {fix_hint(weight)}")
    return obj


def load_strict(module, state: dict[str, Any], path: Path, weight: WeightFile, assign: bool = False) -> None:
    """``module.load_state_dict(state, strict=True)``; a mismatch becomes a :class:`WeightsInvalid` that
    summarises the missing, unexpected and wrongly shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or reshaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise WeightsInvalid(f"{path} does not match the {weight.filename} network: {'; '.join(parts)}. "
                             f"It may be another model's checkpoint. {fix_hint(weight)}")
    module.load_state_dict(state, strict=True, assign=assign)


def instantiate(build: Callable[[], Any], state: dict[str, Any], path: Path, weight: WeightFile):
    """Build the network and load ``state`` strictly. The network is built on the meta device and the file's
    tensors are assigned to it (no random initialisation, no second copy of the weights); if anything is left
    on meta (a tensor that is not in the state dict), it is built again on the CPU and loaded normally."""
    import torch

    with torch.device("meta"):
        module = build()
    load_strict(module, state, path, weight, assign=True)
    if _has_meta_tensors(module):
        module = build()
        load_strict(module, state, path, weight)
    return module.float().eval()


def _has_meta_tensors(module) -> bool:
    import torch

    for sub in module.modules():
        for value in list(sub._parameters.values()) + list(sub._buffers.values()) + list(vars(sub).values()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                return True
    return False


def load_network(build: Callable[[], Any], path: Path, weight: WeightFile, wrapper: str | None,
                 fallbacks: tuple[str, ...] = ()):
    """Read ``path`` safely, take the state dict out of its wrapper and load it strictly into ``build()``."""
    obj = read_checkpoint(path, weight)
    state = extract_state_dict(obj, path, weight, wrapper, fallbacks)
    return instantiate(build, state, path, weight)


def verify_structure(build: Callable[[], Any], path: Path, weight: WeightFile, wrapper: str | None,
                     fallbacks: tuple[str, ...] = ()) -> None:
    """Raise unless ``path`` loads strictly into the network; the network is built on meta (no memory)."""
    import torch

    obj = read_checkpoint(Path(path), weight)
    state = extract_state_dict(obj, Path(path), weight, wrapper, fallbacks)
    with torch.device("meta"):
        module = build()
    load_strict(module, state, Path(path), weight, assign=True)
