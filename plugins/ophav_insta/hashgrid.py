"""Multiresolution hash encoding (Instant-NGP) with interchangeable backends.

The layout follows tiny-cuda-nn's ``HashGrid`` exactly, so a table trained with one backend is valid for the
others and tiny-cuda-nn can run on our parameters directly:

* level ``l`` has ``scale_l = 2**(l * log2(per_level_scale)) * base_resolution - 1`` (float32 arithmetic) and
  ``resolution_l = ceil(scale_l) + 1`` vertices per axis;
* a point ``x`` in ``[0, 1]^3`` sits at ``x * scale_l + 0.5`` in level coordinates (cell = floor, weights = fraction);
* a level stores ``size_l = min(next_multiple(resolution_l**3, 8), 2**log2_table)`` entries; it is indexed densely
  (``x + y r + z r^2``) when ``resolution_l**3 <= size_l``, else by the hash ``x ^ y*2654435761 ^ z*805459861``
  (uint32), always modulo ``size_l``;
* the table is one (entries, features) array, levels one after the other; the output is level-major
  ``[l0f0, l0f1, l1f0, ...]``.

Backends: ``torch`` (reference, CPU and GPU), ``triton`` (:mod:`ophav_insta.hashgrid_triton`), ``tcnn``
(tiny-cuda-nn, when ``tinycudann`` imports). No backend computes gradients for the input positions: the positions
come from the (non-learned) deformation.
"""
from __future__ import annotations

import importlib.util
import numpy as np
import torch
from torch import nn

from ophav_insta.hashgrid_layout import PRIMES, HashGridLayout, LevelTables  # noqa: F401 - re-exported

BACKENDS = ("torch", "triton", "tcnn")


# ---------------------------------------------------------------------------------------------- reference

def _axis_corners(cell: torch.Tensor, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per axis, the two grid coordinates (N, 3, 2) and their trilinear weights (N, 3, 2) around a point."""
    return torch.stack([cell, cell + 1], dim=2), torch.stack([1.0 - frac, frac], dim=2)


def level_indices(x: torch.Tensor, layout: HashGridLayout, level: int, fused: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows (N, 8) and trilinear weights (N, 8) of the 8 corners around ``x`` (N, 3) at ``level``; corner
    ``c`` is offset (c & 1, c >> 1 & 1, c >> 2 & 1). ``fused``: round the float32 position once, as a GPU fused
    multiply-add does (else twice, as PyTorch).

    Separable: each axis's two coordinates (times its prime) and weights are formed once and the 8 corners are
    their broadcast combination, a third of the integer work of forming all 8 x 3 corner coordinates."""
    scale = float(layout.scales[level])  # a float32 value: the product below is the float32 one
    res, size = int(layout.resolutions[level]), int(layout.sizes[level])
    if fused and x.dtype == torch.float32:  # float32 x times a float32 scale is exact in float64
        pos = (x.double() * scale + 0.5).float()
    else:
        pos = x * scale + 0.5
    cell = torch.floor(pos)
    coords, w = _axis_corners(cell.to(torch.int64), pos - cell)
    # (N, z, y, x) broadcasts, so that the flattened corner index is x + 2 y + 4 z.
    weight = (w[:, 0, None, None, :] * w[:, 1, None, :, None]) * w[:, 2, :, None, None]
    gx, gy, gz = coords[:, 0, None, None, :], coords[:, 1, None, :, None], coords[:, 2, :, None, None]
    if layout.hashed[level]:
        index = (gx * PRIMES[0]) ^ (gy * PRIMES[1]) ^ (gz * PRIMES[2])
        # Hashed levels hold 2**log2_table entries: the modulo of the uint32 hash is a mask.
        index = index & (size - 1) if size & (size - 1) == 0 else (index & 0xFFFFFFFF) % size
    else:
        index = (gx + gy * res + gz * (res * res)) % size
    return index.reshape(-1, 8) + int(layout.offsets[level]), weight.reshape(-1, 8)


def hash_encode_torch(x: torch.Tensor, table: torch.Tensor, layout: HashGridLayout, fused: bool = False
                      ) -> torch.Tensor:
    """Reference encoding of ``x`` (N, 3) in [0, 1] with ``table`` (entries, F): (N, L * F) in x's dtype
    (float64 inputs give the exact encoding). ``fused``: see :func:`level_indices`.

    A loop over levels keeps the memory at O(N * 8) per level; autograd gives the table gradient. The rows are
    gathered with ``index_select`` when the table needs a gradient (its backward is an index_add) and with
    ``embedding`` otherwise (2-2.5x faster than advanced indexing on the CPU, where previews render)."""
    outs = []
    gather_for_grad = torch.is_grad_enabled() and table.requires_grad
    for level in range(layout.levels):
        index, weight = level_indices(x, layout, level, fused)
        if gather_for_grad:
            values = torch.index_select(table, 0, index.reshape(-1)).view(index.shape[0], 8, table.shape[1])
        else:
            values = torch.nn.functional.embedding(index, table)  # (N, 8, F)
        with torch.autocast(x.device.type, enabled=False):  # the blend stays in the table's precision
            outs.append(torch.bmm(weight[:, None, :].to(values.dtype), values)[:, 0])
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------- backends


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def tcnn_available() -> bool:
    if importlib.util.find_spec("tinycudann") is None:
        return False
    try:
        import tinycudann  # noqa: F401
    except Exception:  # an installed build for another GPU/toolkit raises at import
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``auto`` -> tcnn (CUDA, importable) > triton (CUDA, importable) > torch. An explicit name is checked."""
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        if cuda and tcnn_available():
            return "tcnn"
        if cuda and triton_available():
            return "triton"
        return "torch"
    if name == "tcnn" and not (cuda and tcnn_available()):
        raise RuntimeError("hash encoding backend 'tcnn' needs CUDA and an importable tinycudann")
    if name == "triton":
        import os

        if not triton_available():
            raise RuntimeError("hash encoding backend 'triton' needs the triton package")
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("hash encoding backend 'triton' needs CUDA (or TRITON_INTERPRET=1 for testing)")
    if name not in BACKENDS:
        raise ValueError(f"unknown hash encoding backend {name!r}")
    return name


class _TcnnAdapter:
    """tiny-cuda-nn's encoding run on our parameter tensor (same layout), so checkpoints stay backend-free."""

    def __init__(self, layout: HashGridLayout):
        import tinycudann as tcnn
        from tinycudann import modules as tcnn_modules

        self._apply = tcnn_modules._module_function.apply
        self.encoding = tcnn.Encoding(3, layout.tcnn_config(), dtype=torch.float32)
        expected = layout.entries * layout.features
        if self.encoding.params.numel() != expected:
            raise RuntimeError(f"tiny-cuda-nn hash grid has {self.encoding.params.numel()} parameters, the layout "
                               f"{expected}: incompatible tinycudann version")
        self.granularity = 128  # tcnn's batch size granularity

    def __call__(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        padded = (n + self.granularity - 1) // self.granularity * self.granularity
        if padded != n:
            x = torch.nn.functional.pad(x, (0, 0, 0, padded - n))
        enc = self.encoding
        params = table.reshape(-1).to(enc.dtype).contiguous()
        out = self._apply(enc.native_tcnn_module, x.contiguous(), params, enc.loss_scale)
        return out[:n].float()


class HashGrid(nn.Module):
    """The encoding as a module: ``forward(x)`` with x (N, 3) in [0, 1] (clamped) -> (N, L * F) float32."""

    def __init__(self, layout: HashGridLayout, backend: str = "torch"):
        super().__init__()
        self.layout = layout
        self.table = nn.Parameter(torch.zeros(layout.entries, layout.features))
        self.backend = backend
        self._tables: LevelTables | None = None
        self._tcnn: _TcnnAdapter | None = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            init = torch.rand(self.table.shape, generator=generator, dtype=torch.float32) * 2e-4 - 1e-4
            self.table.copy_(init.to(self.table.device))

    def set_backend(self, backend: str) -> None:
        self.backend = resolve_backend(backend, self.table.device)

    def level_tables(self) -> LevelTables:
        if self._tables is None or self._tables.scales.device != self.table.device:
            self._tables = LevelTables.build(self.layout, self.table.device)
        return self._tables

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().clamp(0.0, 1.0).contiguous()
        return encode(x, self.table, self.layout, self.backend, self)

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"levels={lay.levels}, features={lay.features}, log2_table={lay.log2_table}, "
                f"resolution={lay.base_resolution}..{lay.finest_resolution}, backend={self.backend}")


def encode(x: torch.Tensor, table: torch.Tensor, layout: HashGridLayout, backend: str,
           owner: HashGrid | None = None) -> torch.Tensor:
    """Encode clamped, contiguous float32 ``x`` with the named backend (``owner`` caches per-device constants)."""
    if backend == "torch":
        return hash_encode_torch(x, table, layout)
    if backend == "triton":
        from ophav_insta.hashgrid_triton import hash_encode_triton

        tables = owner.level_tables() if owner is not None else LevelTables.build(layout, x.device)
        return hash_encode_triton(x, table, tables, layout)
    if backend == "tcnn":
        if owner is None:
            return _TcnnAdapter(layout)(x, table)
        if owner._tcnn is None:
            owner._tcnn = _TcnnAdapter(layout)
        return owner._tcnn(x, table)
    raise ValueError(f"unknown hash encoding backend {backend!r}")


def encoding_bytes(layout: HashGridLayout, num_points: int, backward: bool) -> int:
    """Bytes a kernel must move per call (positions, 8 corner rows per level, output; for the backward the
    incoming gradient and a read-modify-write per corner row): the basis of the reported bandwidth."""
    row = layout.features * 4
    forward = num_points * (12 + layout.levels * (8 * row + row))
    if not backward:
        return forward
    return forward + num_points * (12 + layout.levels * (row + 8 * 2 * row))


def position_rounding_bound(layout: HashGridLayout, table_abs_max: float) -> np.ndarray:
    """Per level, an upper bound of |float32 encoding - exact encoding| (L,), for tables with entries in
    [-table_abs_max, table_abs_max]: what comparisons between backends must tolerate.

    A float32 backend computes the level position ``x * scale + 0.5`` with one rounding (a fused multiply-add,
    as Triton and tiny-cuda-nn do on a GPU) or two (PyTorch): at most one float32 ulp of the largest position
    ``scale + 0.5`` per axis (1.2e-4 at the finest 2048 level). Near a cell boundary the rounding may even pick
    the neighbouring cell, but the trilinear interpolation is continuous there, so per axis the output moves
    by at most that ulp times the largest difference of two table rows (2 * table_abs_max). The blend of 8
    corners adds ~10 float32 epsilons of the table magnitude (16 taken). The exact reference is the float64
    evaluation (``hash_encode_torch(x.double(), table.double(), layout)``: float32 x times a float32 scale is
    exact in float64)."""
    largest = (np.asarray(layout.scales, np.float64) + 0.5).astype(np.float32)
    ulp = np.spacing(largest).astype(np.float64)
    eps = float(np.finfo(np.float32).eps)
    return (3.0 * ulp * 2.0 + 16.0 * eps) * float(table_abs_max)
