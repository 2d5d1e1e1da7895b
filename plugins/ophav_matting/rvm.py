"""Robust Video Matting (Lin et al. 2021) as a segmenter, from the official TorchScript release.

The released files (``rvm_mobilenetv3_fp32.torchscript``, ``rvm_resnet50_fp32.torchscript``) are TorchScript
programs with ``forward(src, r1, r2, r3, r4, downsample_ratio)`` returning ``[fgr, pha, r1, r2, r3, r4]``:
``src`` is RGB in [0, 1] shaped (B, C, H, W) or (B, T, C, H, W), ``r1..r4`` are the ConvGRU states (``None`` for
the first frame, as the RVM inference docs show for PyTorch and TorchScript alike), ``pha`` is the alpha.

Security: TorchScript is the only format these weights are published in, and ``torch.jit.load`` runs the
TorchScript program stored in the file. The file is therefore taken only from the weight store or from a path
the user gave explicitly, never from a URL; use the official release file.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ophav_core.errors import InvalidData, UsageError
from ophav_core.stages import FrameSet, MaskSet, Segmenter, Tracking
from ophav_core.weights import require
from ophav_matting.headcut import head_cut
from ophav_matting.options import RVMOptions
from ophav_matting.weights import RVM_WEIGHTS

RVM_ARGUMENTS = ("src", "r1", "r2", "r3", "r4", "downsample_ratio")


def auto_downsample_ratio(height: int, width: int, max_internal_size: int = 512) -> float:
    """RVM's internal scale: the long side becomes at most ``max_internal_size`` px (RVM's docs: keep the
    downsampled resolution between 256 and 512), never upsampled."""
    return min(1.0, max_internal_size / float(max(height, width)))


def internal_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """(height, width) RVM works at inside for ``ratio`` (torch's floor rounding of a scale factor)."""
    return int(math.floor(height * ratio)), int(math.floor(width * ratio))


def rvm_weight_path(variant: str, explicit: str | None) -> Path:
    """The .torchscript file to load: an explicit local path, else the weight store (WeightsMissing if absent)."""
    if explicit is not None and "://" in str(explicit):
        raise UsageError(f"RVM weights must be a local file, not a URL ({explicit}): loading a TorchScript file runs "
                         f"its program. Download it yourself and run `ophav weights add {RVM_WEIGHTS[variant].name} FILE`")
    return require(RVM_WEIGHTS[variant], explicit)


def load_torchscript(path: str | Path, device: str = "cpu"):
    """Load an RVM TorchScript file onto ``device`` in eval mode, checking its forward signature."""
    import torch

    with warnings.catch_warnings():
        # torch 2.x marks TorchScript deprecated; it is still the only format RVM ships in.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(str(path), map_location=device)
    check_rvm_signature(model, path)
    return model.eval()


def check_rvm_signature(model: Any, path: str | Path = "model") -> None:
    try:
        names = tuple(arg.name for arg in model.forward.schema.arguments)[1:]  # drop self
    except (AttributeError, RuntimeError) as exc:
        raise InvalidData(f"{path}: not a TorchScript module with a forward method ({exc})") from exc
    if names[:len(RVM_ARGUMENTS)] != RVM_ARGUMENTS:
        raise InvalidData(f"{path}: forward takes {names}, expected RVM's {RVM_ARGUMENTS}")


def verify_torchscript(path: Path) -> None:
    """Weight-store check: a TorchScript module with RVM's forward signature."""
    load_torchscript(path, "cpu")


def run_matting(model: Any, frames: np.ndarray, downsample_ratio: float, device: str = "cpu", seq_chunk: int = 4,
                warmup_frames: int = 0, on_chunk: Callable[[int], None] | None = None,
                out: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    """Alpha (N, H, W) float32 of uint8 RGB ``frames`` (N, H, W, 3), frame after frame with the recurrent state
    carried across chunks of ``seq_chunk`` frames. Returns the alpha and the last recurrent state."""
    import torch

    n, height, width = frames.shape[:3]
    alpha = out if out is not None else np.empty((n, height, width), np.float32)
    rec: list = [None] * 4
    ratio = float(downsample_ratio)
    with torch.inference_mode():
        warmup = min(int(warmup_frames), n)
        for start in range(0, warmup, seq_chunk):  # prime the state only; outputs are discarded
            _, _, *rec = model(_to_source(frames[start:min(start + seq_chunk, warmup)], device), *rec, ratio)
        for start in range(0, n, seq_chunk):
            chunk = frames[start:start + seq_chunk]
            _, pha, *rec = model(_to_source(chunk, device), *rec, ratio)
            alpha[start:start + len(chunk)] = pha.reshape(len(chunk), height, width).float().cpu().numpy()
            if on_chunk is not None:
                on_chunk(len(chunk))
    np.clip(alpha, 0.0, 1.0, out=alpha)
    return alpha, rec


def _to_source(chunk: np.ndarray, device: str):
    """(T, H, W, 3) uint8 -> (1, T, 3, H, W) float in [0, 1] on ``device``: RVM's sequence input."""
    import torch

    src = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
    return src.permute(0, 3, 1, 2).unsqueeze(0).float().div_(255.0)


class RVMSegmenter(Segmenter):
    """Robust Video Matting person matte, cut below the jaw when the run has a tracking.

    Without a tracking the result is RVM's whole-person matte (head, neck, body, clothes): combine it with a
    tracker, or use the ``bisenet`` segmenter, to get a head-only matte. The file is a TorchScript program (see
    the module docstring): it is loaded from the weight store or from ``options.weights`` only.
    """

    Options = RVMOptions

    def __init__(self, options=None, context=None):
        super().__init__(options, context)
        self._model = None

    def model(self):
        if self._model is None:
            path = rvm_weight_path(self.options.variant, self.options.weights)
            self._model = load_torchscript(path, self.context.device)
        return self._model

    def downsample_ratio(self, height: int, width: int) -> float:
        if self.options.downsample_ratio is not None:
            return float(self.options.downsample_ratio)
        return auto_downsample_ratio(height, width, self.options.max_internal_size)

    def matte(self, frames: FrameSet) -> np.ndarray:
        """RVM's person alpha (N, H, W) float32 for every frame."""
        model = self.model()
        width, height = frames.size
        ratio = self.downsample_ratio(height, width)
        with self.context.progress(len(frames), f"rvm matting (downsample {ratio:.3g})") as bar:
            alpha, _ = run_matting(model, frames.frames, ratio, self.context.device, self.options.seq_chunk,
                                   self.options.warmup_frames, on_chunk=bar.advance)
        return alpha

    def segment(self, frames: FrameSet, tracking: Tracking | None = None) -> MaskSet:
        alpha = self.matte(frames)
        if tracking is not None and self.options.head_cut:
            head_cut(alpha, tracking, self.options.neck_margin, self.options.feather, inplace=True)
        return MaskSet(alpha)
