"""The Gaussian-splatting rasteriser (``ophav_gaussians.raster``): frames per second per backend.

    python benchmarks/bench_gaussians_raster.py --out benchmarks/out/gaussians_raster.json

On CUDA: a synthetic head-like cloud (100k Gaussians: flat discs tangent to an ellipsoid head of 18 x 24 x 20 cm,
1-2 mm wide, plus a looser hair layer), rendered at 512x512 by cameras 1 m away (focal 1800 px: the head fills
~2/3 of the frame, as a fitted avatar's training views do), yaw spread over +-30 degrees across the batch.

- forward only (``torch.no_grad``) and forward + backward (gradients of means, quats, scales, opacities,
  colours), batch 1, 8, 16 and 32, per backend (triton; the PyTorch reference at batch 1 only, for scale;
  gsplat when it imports): ms per call and frames/s (= batch / time);
- where the time of one triton frame goes (projection: the fused kernel the triton backend uses, beside the
  torch ops of the reference backend for comparison; binning with its one host sync; compositing);
- a sweep of the triton kernel configurations (rows per program, Gaussians per chunk, warps) at batch 1 and 16,
  to set the defaults in ``raster/triton_kernels.py`` from measurements; the main rows use the defaults;
- tile statistics: visible Gaussians, intersections, mean and max list length.

Timing: median of synchronised calls after warm-up (``benchmarks/timing.py``). Targets (issue 17, one H200):
>= 300 frames/s at batch 1 and >= 1000 frames/s batched, render only. Without CUDA it runs a small smoke
version (64x64, 3k Gaussians, torch backend) so the script itself can be checked on the CPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import torch  # noqa: E402

from ophav_gaussians.raster import (bin_gaussians, gsplat_available, project_gaussians,  # noqa: E402
                                    render_gaussians, triton_available)
from timing import median_time  # noqa: E402


def head_cloud(num: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Discs tangent to an ellipsoid (metres, head centred at the origin, OpenCV axes: y down, z away from the
    camera), 80% on the skin surface and 20% as a hair layer 0-2 cm outside its upper half."""
    g = torch.Generator().manual_seed(seed)
    semi = torch.tensor([0.09, 0.12, 0.10])
    direction = torch.nn.functional.normalize(torch.randn(num, 3, generator=g), dim=-1)
    hair = torch.rand(num, generator=g) < 0.2
    direction[hair, 1] = -direction[hair, 1].abs()  # hair on the upper half (y up is negative)
    lift = torch.where(hair, 1.0 + 0.2 * torch.rand(num, generator=g), torch.ones(num))
    means = direction * semi * lift[:, None]
    normal = torch.nn.functional.normalize(direction / semi, dim=-1)
    # Rotation taking the disc's thin axis (z) onto the surface normal: q = (1 + n_z, -n_y, n_x, 0).
    quats = torch.stack([1 + normal[:, 2] + 1e-6, -normal[:, 1], normal[:, 0], torch.zeros(num)], dim=-1)
    spread = torch.exp(0.35 * torch.randn(num, 1, generator=g))
    tangent = 0.0011 * spread * torch.where(hair, 1.8, 1.0)[:, None]
    scales = torch.cat([tangent * torch.exp(0.2 * torch.randn(num, 2, generator=g)), 0.15 * tangent], dim=-1)
    opacities = 0.35 + 0.65 * torch.rand(num, generator=g)
    colors = torch.rand(num, 3, generator=g) * 0.6 + 0.2
    return {k: v.to(device) for k, v in dict(means=means, quats=quats, scales=scales, opacities=opacities,
                                               colors=colors).items()}


def cameras(batch: int, size: int, focal: float, distance: float, device: torch.device):
    """World->camera (OpenCV) matrices orbiting the head in yaw (+-30 degrees across the batch) and Ks."""
    views = []
    for b in range(batch):
        yaw = math.radians(-30 + 60 * b / max(batch - 1, 1)) if batch > 1 else 0.0
        c, s = math.cos(yaw), math.sin(yaw)
        view = torch.eye(4)
        view[:3, :3] = torch.tensor([[c, 0, -s], [0, 1, 0], [s, 0, c]])
        view[:3, 3] = torch.tensor([0.0, 0.0, distance])
        views.append(view)
    K = torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]])
    return torch.stack(views).to(device), K.repeat(batch, 1, 1).to(device)


def make_step(cloud, viewmats, Ks, size, backend, backward):
    leaves = {k: v.clone().requires_grad_(backward) for k, v in cloud.items()}
    background = torch.ones(3, device=viewmats.device)

    def step():
        if backward:
            for v in leaves.values():
                v.grad = None
            out = render_gaussians(**leaves, viewmats=viewmats, Ks=Ks, width=size, height=size,
                                   background=background, backend=backend)
            (out["image"].square().mean() + 0.1 * out["alpha"].mean()).backward()
        else:
            with torch.no_grad():
                render_gaussians(**leaves, viewmats=viewmats, Ks=Ks, width=size, height=size, background=background,
                                 backend=backend)

    return step


def time_row(cloud, size, focal, distance, batch, backend, backward, device, iters, warmup):
    viewmats, Ks = cameras(batch, size, focal, distance, device)
    seconds = median_time(make_step(cloud, viewmats, Ks, size, backend, backward), device, iters, warmup)
    return dict(backend=backend, batch=batch, mode="forward+backward" if backward else "forward",
                ms=1000 * seconds, fps=batch / seconds)


def tile_statistics(cloud, size, focal, distance, batch, device):
    viewmats, Ks = cameras(batch, size, focal, distance, device)
    proj = project_gaussians(cloud["means"], cloud["quats"], cloud["scales"], cloud["opacities"], viewmats, Ks,
                             size, size)
    tiles = bin_gaussians(proj, size, size)
    lengths = tiles.ranges.diff().float()
    return dict(batch=batch, visible_per_view=float(proj.visible.float().sum(1).mean()),
                intersections_per_view=tiles.gaussian_ids.numel() / batch, mean_list=float(lengths.mean()),
                max_list=int(lengths.max()), mean_radius=float(proj.radii[proj.visible].float().mean()))


def breakdown(cloud, size, focal, distance, device, iters, warmup):
    """ms of the stages of one triton forward frame (each timed on its own, so they overlap nothing)."""
    from ophav_gaussians.raster.triton_kernels import project_gaussians_triton, rasterize_triton

    viewmats, Ks = cameras(1, size, focal, distance, device)
    args = (cloud["means"], cloud["quats"], cloud["scales"], cloud["opacities"], viewmats, Ks, size, size)
    proj = project_gaussians(*args)
    tiles = bin_gaussians(proj, size, size)
    features = torch.cat([cloud["colors"].expand(1, -1, -1), proj.depths[..., None]], dim=-1)
    with torch.no_grad():
        stages = {"projection (fused kernel, rendering)": lambda: project_gaussians_triton(*args),
                  "projection (torch ops, the reference backend's)": lambda: project_gaussians(*args),
                  "binning (sort, 1 sync)": lambda: bin_gaussians(proj, size, size),
                  "compositing kernel": lambda: rasterize_triton(proj, tiles, cloud["opacities"], features, size,
                                                                 size)}
        return {name: 1000 * median_time(fn, device, iters, warmup) for name, fn in stages.items()}


def sweep(cloud, size, focal, distance, device, iters, warmup):
    """fps per kernel configuration, forward at batch 1 and 16, then backward with the best forward."""
    from ophav_gaussians.raster import triton_kernels as tk

    default_forward, default_backward = tk.FORWARD, tk.BACKWARD
    rows = []
    forward_configs = [tk.KernelConfig(r, c, w) for r, c, w in
                       ((16, 16, 8), (8, 16, 4), (8, 32, 8), (4, 32, 4), (4, 16, 2), (8, 8, 2), (2, 32, 2))]
    backward_configs = [tk.KernelConfig(r, c, w) for r, c, w in
                        ((4, 16, 4), (8, 16, 8), (8, 8, 4), (4, 8, 2), (2, 16, 2), (2, 8, 1))]
    try:
        best = {}
        for config in forward_configs:
            tk.FORWARD = config
            for batch in (1, 16):
                row = time_row(cloud, size, focal, distance, batch, "triton", False, device, iters, warmup)
                rows.append(dict(kernel="forward", config=vars(config).copy(), **row))
                if batch == 16 and row["fps"] > best.get("fps", 0):
                    best = dict(fps=row["fps"], config=config)
        tk.FORWARD = best["config"]
        for config in backward_configs:
            tk.BACKWARD = config
            for batch in (1, 16):
                row = time_row(cloud, size, focal, distance, batch, "triton", True, device, iters, warmup)
                rows.append(dict(kernel="backward", config=vars(config).copy(), **row))
    finally:
        tk.FORWARD, tk.BACKWARD = default_forward, default_backward
    return rows


def markdown(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--gaussians", type=int, default=None, help="default 100k on CUDA, 3k on the CPU")
    parser.add_argument("--size", type=int, default=None, help="default 512 on CUDA, 64 on the CPU")
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel configuration sweep")
    parser.add_argument("--backends", nargs="+", default=None, choices=["triton", "torch", "gsplat"],
                        help="default: every one available (gsplat JIT-compiles its CUDA code on first use)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or (512 if cuda else 64)
    num = args.gaussians or (100_000 if cuda else 3_000)
    focal, distance = 1800.0 * size / 512, 1.0
    iters, warmup = (30, 5) if cuda else (2, 1)
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    report = dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, triton=_version("triton"), gsplat=_version("gsplat"),
                  python=platform.python_version(), gaussians=num, size=size, focal=focal)
    print(f"device: {name}  torch {torch.__version__}  triton {report['triton']}  gsplat {report['gsplat']}  "
          f"{report['date']}\n{num} Gaussians, {size}x{size}", flush=True)
    cloud = head_cloud(num, device)

    report["tiles"] = [tile_statistics(cloud, size, focal, distance, b, device) for b in (1, 16)]
    print("\n" + markdown(report["tiles"], ["batch", "visible_per_view", "intersections_per_view", "mean_list",
                                            "max_list", "mean_radius"]), flush=True)

    backends = (["triton"] if cuda and triton_available() else []) + ["torch"]
    if cuda and gsplat_available():
        backends.append("gsplat")
    if args.backends:
        backends = [b for b in backends if b in args.backends]
    batches = (1, 8, 16, 32) if cuda else (1, 2)
    rows = []
    for backend in backends:
        for backward in (False, True):
            for batch in batches:
                if backend == "torch" and cuda and batch > 1:
                    continue  # the reference loops over tiles in Python: one row for scale is enough
                n_iter, n_warm = (3, 1) if backend == "torch" else (iters, warmup)
                try:
                    row = time_row(cloud, size, focal, distance, batch, backend, backward, device, n_iter, n_warm)
                except Exception as error:  # noqa: BLE001 (one backend failing must not hide the others)
                    row = dict(backend=backend, batch=batch, mode="forward+backward" if backward else "forward",
                               error=f"{type(error).__name__}: {error}"[:300])
                rows.append(row)
                print(f"  {row}", flush=True)
    report["rows"] = rows
    print("\n" + markdown(rows, ["backend", "mode", "batch", "ms", "fps", "error"]))

    if cuda and "triton" in backends:
        report["breakdown_ms"] = breakdown(cloud, size, focal, distance, device, iters, warmup)
        print("\ntriton forward, batch 1, ms per stage: "
              + ", ".join(f"{k} {v:.3f}" for k, v in report["breakdown_ms"].items()))
        if not args.no_sweep:
            report["sweep"] = sweep(cloud, size, focal, distance, device, 10, 3)
            flat = [dict(kernel=r["kernel"], rows=r["config"]["rows"], chunk=r["config"]["chunk"],
                         warps=r["config"]["warps"], batch=r["batch"], ms=r["ms"], fps=r["fps"])
                    for r in report["sweep"]]
            print("\nkernel configurations (backward rows use the fastest forward at batch 16)\n"
                  + markdown(flat, ["kernel", "rows", "chunk", "warps", "batch", "ms", "fps"]))
    print("\ntargets (issue 17, one H200): >= 300 frames/s at batch 1, >= 1000 frames/s batched (forward)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
