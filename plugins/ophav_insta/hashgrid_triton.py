"""Triton kernels of the hash encoding (layout in :mod:`ophav_insta.hashgrid`).

One program handles ``BLOCK`` points of one level (grid = (point blocks, levels)), as tiny-cuda-nn does: the
level's part of the table stays hot in the cache while its points are processed. The forward gathers the 8
corner rows and blends them; the backward recomputes the corners and scatters ``weight * dL/dout`` into the
table gradient with atomic adds. Index arithmetic is uint32, so the hash wraps exactly as tiny-cuda-nn's.

Runs under ``TRITON_INTERPRET=1`` on the CPU too (how the tests check it without a GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ophav_insta.hashgrid_layout import HashGridLayout, LevelTables

BLOCK_FORWARD = 128
BLOCK_BACKWARD = 128


@triton.jit
def _level_setup(x_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr, hashed_ptr, n, mask, level):
    """Level constants and the point's cell (uint32) and fraction per axis."""
    scale = tl.load(scales_ptr + level)
    res = tl.load(res_ptr + level).to(tl.uint32)
    size = tl.load(sizes_ptr + level).to(tl.uint32)
    offset = tl.load(offsets_ptr + level)
    hashed = tl.load(hashed_ptr + level) != 0
    px = tl.load(x_ptr + n * 3 + 0, mask=mask, other=0.0) * scale + 0.5
    py = tl.load(x_ptr + n * 3 + 1, mask=mask, other=0.0) * scale + 0.5
    pz = tl.load(x_ptr + n * 3 + 2, mask=mask, other=0.0) * scale + 0.5
    fx = tl.floor(px)
    fy = tl.floor(py)
    fz = tl.floor(pz)
    return (res, size, offset, hashed, fx.to(tl.int32).to(tl.uint32), fy.to(tl.int32).to(tl.uint32),
            fz.to(tl.int32).to(tl.uint32), px - fx, py - fy, pz - fz)


@triton.jit
def _corner(cx, cy, cz, wx, wy, wz, res, size, offset, hashed,
            BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr, F: tl.constexpr):
    """Element offset (int64, first feature) of one corner's table row, and its trilinear weight."""
    gx = cx + BX
    gy = cy + BY
    gz = cz + BZ
    w = (wx if BX else 1.0 - wx) * (wy if BY else 1.0 - wy)
    w = w * (wz if BZ else 1.0 - wz)
    dense = gx + gy * res + gz * (res * res)
    hashed_index = gx ^ (gy * 2654435761) ^ (gz * 805459861)
    index = tl.where(hashed, hashed_index, dense) % size
    # Rows start at multiples of F: lets the compiler load/add a row's features as one vector.
    return tl.multiple_of((index.to(tl.int64) + offset) * F, F), w


@triton.jit
def _hash_forward_kernel(x_ptr, table_ptr, out_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr, hashed_ptr,
                         num_points, L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    level = tl.program_id(1)
    n = block * BLOCK + tl.arange(0, BLOCK)
    mask = n < num_points
    res, size, offset, hashed, cx, cy, cz, wx, wy, wz = _level_setup(
        x_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr, hashed_ptr, n, mask, level)
    feature = tl.arange(0, F)
    acc = tl.zeros((BLOCK, F), dtype=tl.float32)
    for c in tl.static_range(8):
        row, w = _corner(cx, cy, cz, wx, wy, wz, res, size, offset, hashed, c & 1, (c >> 1) & 1, (c >> 2) & 1, F)
        values = tl.load(table_ptr + row[:, None] + feature[None, :], mask=mask[:, None], other=0.0)
        acc += w[:, None] * values
    out = out_ptr + n[:, None].to(tl.int64) * (L * F) + level * F + feature[None, :]
    tl.store(out, acc, mask=mask[:, None])


@triton.jit
def _hash_backward_kernel(x_ptr, grad_out_ptr, grad_table_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr,
                          hashed_ptr, num_points, L: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    level = tl.program_id(1)
    n = block * BLOCK + tl.arange(0, BLOCK)
    mask = n < num_points
    res, size, offset, hashed, cx, cy, cz, wx, wy, wz = _level_setup(
        x_ptr, scales_ptr, res_ptr, sizes_ptr, offsets_ptr, hashed_ptr, n, mask, level)
    feature = tl.arange(0, F)
    grad_ptr = grad_out_ptr + n[:, None].to(tl.int64) * (L * F) + level * F + feature[None, :]
    grad = tl.load(grad_ptr, mask=mask[:, None], other=0.0)
    for c in tl.static_range(8):
        row, w = _corner(cx, cy, cz, wx, wy, wz, res, size, offset, hashed, c & 1, (c >> 1) & 1, (c >> 2) & 1, F)
        tl.atomic_add(grad_table_ptr + row[:, None] + feature[None, :], w[:, None] * grad, mask=mask[:, None])


def _launch_args(tables: LevelTables) -> tuple:
    return tables.scales, tables.resolutions, tables.sizes, tables.offsets, tables.hashed


class _HashEncodeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, tables: LevelTables, layout: HashGridLayout):
        num = x.shape[0]
        out = torch.empty(num, layout.output_dim, device=x.device, dtype=torch.float32)
        if num:
            grid = (triton.cdiv(num, BLOCK_FORWARD), layout.levels)
            _hash_forward_kernel[grid](x, table.detach().contiguous(), out, *_launch_args(tables), num,
                                       L=layout.levels, F=layout.features, BLOCK=BLOCK_FORWARD)
        ctx.save_for_backward(x)
        ctx.tables, ctx.layout, ctx.table_shape = tables, layout, table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        layout = ctx.layout
        grad_table = torch.zeros(ctx.table_shape, device=x.device, dtype=torch.float32)
        num = x.shape[0]
        if num:
            grad_out = grad_out.float().contiguous()
            grid = (triton.cdiv(num, BLOCK_BACKWARD), layout.levels)
            _hash_backward_kernel[grid](x, grad_out, grad_table, *_launch_args(ctx.tables), num,
                                        L=layout.levels, F=layout.features, BLOCK=BLOCK_BACKWARD)
        return None, grad_table, None, None


def hash_encode_triton(x: torch.Tensor, table: torch.Tensor, tables: LevelTables, layout: HashGridLayout) -> torch.Tensor:
    """Encode ``x`` (N, 3) float32 contiguous in [0, 1]: (N, L * F) float32, differentiable w.r.t. ``table``."""
    return _HashEncodeTriton.apply(x, table, tables, layout)
