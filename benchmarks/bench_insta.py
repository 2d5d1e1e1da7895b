"""Speed (and optionally quality) of the INSTA avatar field. Uses CUDA when present, else the CPU (small sizes).

Speed mode (default), on a synthetic 512x512 head:

* hash encoding forward and forward+backward time per backend (torch reference, triton, tcnn when importable),
  achieved bandwidth (bytes a kernel must move / time, see ``hashgrid.encoding_bytes``) and the largest
  difference to the reference (outputs and table gradients);
* training iterations/s at ``--batch-rays`` after a warm-up past the occupancy warm-up (steady state, empty
  space skipped), with the evaluated samples per ray;
* render frames/s of a 512x512 image with the trained head (EMA weights, early ray termination).

    python benchmarks/bench_insta.py [--size 512] [--train-warmup 400] [--train-iters 300] [--out bench.json]

Quality mode trains on a dataset directory holding ``frames.npz`` (FrameSet.save), ``masks.npz`` (MaskSet) and
``tracking.npz`` (Tracking), holding out every ``--holdout-every``-th frame, and reports the held-out PSNR
(whole image over the background, and inside the head mask) at each of ``--quality-iters``:

    python benchmarks/bench_insta.py --quality DATASET_DIR --quality-iters 2000 5000 10000 --out quality.json

Needs torch, numpy and pydantic (on the GPU machine carry the wheels of ../shared/tools/device-wheels.sh).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ophav_core.stages.data import FrameSet, MaskSet, Tracking  # noqa: E402
from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking  # noqa: E402
from ophav_insta.field import build_trainer  # noqa: E402
from ophav_insta.hashgrid import (HashGrid, HashGridLayout, encoding_bytes, resolve_backend,  # noqa: E402
                                  tcnn_available, triton_available)
from ophav_insta.options import InstaOptions  # noqa: E402
from ophav_insta.train import Scene, Stopwatch, psnr  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(step: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- hash encoding


def bench_encoding(device: torch.device, layout: HashGridLayout, points: int, iters: int) -> list[dict]:
    """Per backend: forward / forward+backward seconds, GB/s, max error against the torch reference."""
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(points, 3, device=device, generator=gen)
    grad_out = torch.randn(points, layout.output_dim, device=device, generator=gen)
    reference = HashGrid(layout, "torch").to(device)
    with torch.no_grad():
        reference.table.copy_(torch.randn(reference.table.shape, device=device, generator=gen) * 0.1)
    ref_out = reference(x)
    (ref_out * grad_out).sum().backward()
    ref_out = ref_out.detach()
    ref_grad = reference.table.grad.clone()
    cuda = device.type == "cuda"
    names = ["torch"] + [n for n, ok in (("triton", cuda and triton_available()), ("tcnn", cuda and tcnn_available())) if ok]
    rows = []
    for name in names:
        grid = HashGrid(layout, name).to(device)
        with torch.no_grad():
            grid.table.copy_(reference.table)

        def forward():
            with torch.no_grad():
                return grid(x)

        def forward_backward():
            grid.table.grad = None
            (grid(x) * grad_out).sum().backward()

        fwd = median_time(forward, device, iters, 3)
        both = median_time(forward_backward, device, iters, 3)
        out = forward()
        grid.table.grad = None
        (grid(x) * grad_out).sum().backward()
        rows.append({
            "backend": name, "points": points, "forward_ms": fwd * 1e3, "forward_backward_ms": both * 1e3,
            "forward_GBps": encoding_bytes(layout, points, False) / fwd / 1e9,
            "forward_backward_GBps": encoding_bytes(layout, points, True) / both / 1e9,
            "max_abs_error": float((out - ref_out).abs().max()),
            "max_rel_error": float((out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-12)),
            "grad_max_rel_error": float((grid.table.grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12)),
        })
    return rows


# ---------------------------------------------------------------------------------------------- datasets


def synthetic_dataset(num_frames: int, size: int, render_size: int = 64) -> tuple[FrameSet, MaskSet, Tracking]:
    """The synthetic head at ``size``: rendered at ``render_size`` (where its splats are solid) and upsampled
    bilinearly; the tracking is the same camera at ``size`` (same poses and expressions)."""
    tracking = synthetic_tracking(num_frames, size)
    small, small_masks = render_synthetic(synthetic_tracking(num_frames, render_size))
    up = lambda a: torch.nn.functional.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)  # noqa: E731
    frames = up(torch.from_numpy(small.frames).permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1)
    alpha = up(torch.from_numpy(small_masks.alpha)[:, None])[:, 0]
    return (FrameSet(frames.round().clamp(0, 255).to(torch.uint8).numpy(), fps=small.fps),
            MaskSet(alpha.clamp(0, 1).numpy().astype(np.float32)), tracking)


def load_dataset(folder: Path) -> tuple[FrameSet, MaskSet, Tracking]:
    return FrameSet.load(folder / "frames.npz"), MaskSet.load(folder / "masks.npz"), Tracking.load(folder / "tracking.npz")


def split(frames: FrameSet, masks: MaskSet, tracking: Tracking, every: int):
    index = np.arange(len(frames))
    held = index[::every] if every > 1 else index[:0]
    train = np.setdiff1d(index, held)
    pick = lambda idx: (FrameSet(frames.frames[idx], frames.fps), MaskSet(masks.alpha[idx]), tracking.subset(idx))  # noqa: E731
    return pick(train), pick(held)


# ---------------------------------------------------------------------------------------------- training / rendering


def bench_training(options: InstaOptions, device: torch.device, frames, masks, tracking, warmup: int, iters: int,
                   render_iters: int) -> dict:
    backend = resolve_backend(options.backend, device)
    total = warmup + iters
    start = time.perf_counter()
    trainer, _ = build_trainer(options, frames, masks, tracking, device, 0, backend, total)
    setup = time.perf_counter() - start
    for _ in range(warmup):
        trainer.step()
    synchronize(device)
    trainer.samples_evaluated = trainer.rays_traced = 0
    watch = Stopwatch(device)
    for _ in range(iters):
        loss, mse = trainer.step()
    seconds = watch.elapsed()
    train_psnr = psnr(float(mse))
    trainer.finalize()
    index = len(frames) // 2

    def render():
        return trainer.render_frame(index)

    render_seconds = median_time(render, device, render_iters, 2)
    rgb, _ = render()
    render_psnr = psnr(float(((rgb - trainer.target(index)) ** 2).mean()))
    return {
        "backend": backend, "setup_s": setup, "batch_rays": trainer.options.batch_rays, "iterations_timed": iters,
        "iterations_per_s": iters / seconds, "samples_per_ray": trainer.samples_evaluated / max(trainer.rays_traced, 1),
        "occupied_fraction": trainer.occupancy.fraction(), "train_batch_psnr": train_psnr,
        "render_ms": render_seconds * 1e3, "render_fps": 1.0 / render_seconds, "render_psnr": render_psnr,
        "render_size": list(frames.size),
    }


def quality(options: InstaOptions, device: torch.device, folder: Path, checkpoints: list[int], every: int,
            eval_frames: int) -> dict:
    frames, masks, tracking = load_dataset(folder)
    (train_f, train_m, train_t), (held_f, held_m, held_t) = split(frames, masks, tracking, every)
    backend = resolve_backend(options.backend, device)
    trainer, _ = build_trainer(options, train_f, train_m, train_t, device, 0, backend, max(checkpoints))
    held_scene = Scene.build(held_f, held_m, held_t, trainer.geometry, device)
    pick = np.unique(np.linspace(0, len(held_f) - 1, min(eval_frames, len(held_f))).round().astype(int))
    results, elapsed, watch = [], 0.0, Stopwatch(device)
    for step in range(1, max(checkpoints) + 1):
        trainer.step()
        if step not in checkpoints:
            continue
        elapsed += watch.elapsed()  # training time only, the evaluation below is not counted
        trainer.finalize()
        full, head = [], []
        for i in pick:
            rgb, _ = trainer.render_frame(int(i), held_scene)
            target = trainer.target(int(i), held_scene)
            err = ((rgb - target) ** 2).mean(dim=-1)
            mask = held_scene.masks[int(i)] > 127
            full.append(float(err.mean()))
            head.append(float(err[mask].mean()) if bool(mask.any()) else float("nan"))
        results.append({"iterations": step, "train_seconds": elapsed, "heldout_psnr": psnr(float(np.mean(full))),
                        "heldout_psnr_head": psnr(float(np.nanmean(head))), "frames": int(len(pick))})
        print(f"  {step:>7d} it  {elapsed:7.1f} s  held-out PSNR {results[-1]['heldout_psnr']:.2f} dB "
              f"(head {results[-1]['heldout_psnr_head']:.2f} dB)", flush=True)
        watch = Stopwatch(device)
    return {"dataset": str(folder), "train_frames": len(train_f), "heldout_frames": len(held_f), "results": results}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=None, help="synthetic image size (512 on CUDA, 64 on the CPU)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--batch-rays", type=int, default=4096)
    parser.add_argument("--train-warmup", type=int, default=None, help="untimed iterations (400 on CUDA)")
    parser.add_argument("--train-iters", type=int, default=None, help="timed iterations (300 on CUDA)")
    parser.add_argument("--render-iters", type=int, default=10)
    parser.add_argument("--points", type=int, default=None, help="hash encoding batch (2^18 on CUDA)")
    parser.add_argument("--log2-table", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "tcnn"])
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the MLPs and the deformation")
    parser.add_argument("--quality", type=Path, default=None, help="dataset folder: run the quality mode")
    parser.add_argument("--quality-iters", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--holdout-every", type=int, default=10)
    parser.add_argument("--eval-frames", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    options = InstaOptions(batch_rays=args.batch_rays if cuda else min(args.batch_rays, 512), backend=args.backend,
                           amp=not args.no_amp, compile=args.compile, log2_table=args.log2_table if args.log2_table else (19 if cuda else 14),
                           **({} if cuda else {"samples_per_ray": 32, "candidate_grid": 12, "occupancy_resolution": 32,
                                               "occupancy_warmup": 60}))
    report: dict = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
                    "options": options.model_dump()}
    print(f"device: {name}  torch {torch.__version__}  backend {resolve_backend(options.backend, device)}", flush=True)

    if args.quality is not None:
        report["quality"] = quality(options, device, args.quality, sorted(args.quality_iters), args.holdout_every,
                                    args.eval_frames)
    else:
        layout = HashGridLayout(options.levels, options.features_per_level, options.log2_table,
                                options.base_resolution, options.finest_resolution)
        points = args.points or (1 << 18 if cuda else 1 << 12)
        report["encoding"] = bench_encoding(device, layout, points, 20 if cuda else 2)
        print(f"\nhash encoding: {layout.levels} levels x {layout.features} features, 2^{layout.log2_table} table, "
              f"{points} points")
        print(f"{'backend':8s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'f+b ms':>8s} {'f+b GB/s':>9s} {'max rel err':>12s} "
              f"{'grad rel err':>12s}")
        for r in report["encoding"]:
            print(f"{r['backend']:8s} {r['forward_ms']:8.3f} {r['forward_GBps']:9.1f} {r['forward_backward_ms']:8.3f} "
                  f"{r['forward_backward_GBps']:9.1f} {r['max_rel_error']:12.2e} {r['grad_max_rel_error']:12.2e}")
        size = args.size or (512 if cuda else 64)
        frames, masks, tracking = synthetic_dataset(args.frames if cuda else 8, size)
        warmup = args.train_warmup if args.train_warmup is not None else (400 if cuda else 70)
        iters = args.train_iters if args.train_iters is not None else (300 if cuda else 10)
        report["training"] = bench_training(options, device, frames, masks, tracking, warmup, iters,
                                            args.render_iters if cuda else 1)
        t = report["training"]
        print(f"\ntraining {size}x{size}, {len(frames)} frames, {t['batch_rays']} rays/batch ({t['backend']}): "
              f"{t['iterations_per_s']:.1f} it/s, {t['samples_per_ray']:.1f} samples/ray evaluated, "
              f"occupied {t['occupied_fraction']:.1%}, batch PSNR {t['train_batch_psnr']:.1f} dB")
        print(f"render {size}x{size}: {t['render_ms']:.1f} ms = {t['render_fps']:.1f} fps "
              f"(PSNR vs its training frame {t['render_psnr']:.1f} dB)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
