"""The hash grid's layout (tiny-cuda-nn's, see :mod:`ophav_insta.hashgrid`) and its per-level constants as
device tensors: what every backend, the reference and the Triton kernels alike, reads."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class HashGridLayout:
    levels: int = 16
    features: int = 2
    log2_table: int = 19
    base_resolution: int = 16
    finest_resolution: int = 2048

    @property
    def per_level_scale(self) -> float:
        if self.levels == 1:
            return 1.0
        return float(np.exp((np.log(self.finest_resolution) - np.log(self.base_resolution)) / (self.levels - 1)))

    @cached_property
    def scales(self) -> np.ndarray:
        """(L,) float32, computed in float32 as tiny-cuda-nn does."""
        log2_scale = np.float32(np.log2(np.float32(self.per_level_scale)))
        levels = np.arange(self.levels, dtype=np.float32)
        return (np.exp2(levels * log2_scale) * np.float32(self.base_resolution) - np.float32(1.0)).astype(np.float32)

    @cached_property
    def resolutions(self) -> np.ndarray:
        return (np.ceil(self.scales).astype(np.int64) + 1)

    @cached_property
    def sizes(self) -> np.ndarray:
        dense = self.resolutions.astype(np.float64) ** 3
        dense = np.minimum(dense, np.iinfo(np.uint32).max // 2).astype(np.int64)
        dense = (dense + 7) // 8 * 8
        return np.minimum(dense, 1 << self.log2_table)

    @cached_property
    def offsets(self) -> np.ndarray:
        """(L + 1,) first entry of each level."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @cached_property
    def hashed(self) -> np.ndarray:
        return self.resolutions.astype(np.float64) ** 3 > self.sizes

    @property
    def entries(self) -> int:
        return int(self.offsets[-1])

    @property
    def output_dim(self) -> int:
        return self.levels * self.features

    def tcnn_config(self) -> dict:
        return {"otype": "HashGrid", "n_levels": self.levels, "n_features_per_level": self.features,
                "log2_hashmap_size": self.log2_table, "base_resolution": self.base_resolution,
                "per_level_scale": self.per_level_scale}


@dataclass
class LevelTables:
    """The per-level constants as device tensors (what the kernels read)."""

    scales: torch.Tensor  # float32 (L,)
    resolutions: torch.Tensor  # int32 (L,)
    sizes: torch.Tensor  # int32 (L,)
    offsets: torch.Tensor  # int64 (L,)
    hashed: torch.Tensor  # int32 (L,)

    @classmethod
    def build(cls, layout: HashGridLayout, device: torch.device | str) -> "LevelTables":
        t = lambda a, dt: torch.as_tensor(np.asarray(a), dtype=dt, device=device)  # noqa: E731
        return cls(t(layout.scales, torch.float32), t(layout.resolutions, torch.int32), t(layout.sizes, torch.int32),
                   t(layout.offsets[:-1], torch.int64), t(layout.hashed, torch.int32))
