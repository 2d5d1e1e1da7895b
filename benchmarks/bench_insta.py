"""Speed (and optionally quality) of the INSTA avatar field. Uses CUDA when present, else the CPU (small sizes).

Speed mode (default), on a synthetic 512x512 head:

* hash encoding forward and forward+backward time per backend (torch reference, triton, tcnn when importable),
  achieved bandwidth (bytes a kernel must move / time, see ``hashgrid.encoding_bytes``), the largest
  difference to the float32 reference, and the largest error against the exact (float64) encoding as a
  fraction of ``hashgrid.position_rounding_bound`` (float32 rounding of grid positions; <= 1 is correct);
* deformation time per backend (torch reference vs the fused triton kernel) for 1M points, and their agreement;
* training iterations/s at ``--batch-rays`` after a warm-up past the occupancy warm-up (steady state, empty
  space skipped), with the evaluated samples per ray, eager and with ``torch.compile`` (``--compile``);
* render frames/s of a 512x512 image with the trained head (EMA weights, early ray termination).

    python benchmarks/bench_insta.py [--size 512] [--train-warmup 400] [--train-iters 300] [--out bench.json]

Profile mode (``--profile``): after the warm-up, where the time of a training step and of a render goes:
per-phase times (CUDA events; pipelined as in real training, and serialized with a sync between phases),
the GPU kernel time per step against the wall time (host/launch bound or GPU bound), and torch.profiler's
top 25 ops by CUDA time:

    python benchmarks/bench_insta.py --profile [--out profile.json]

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
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ophav_core.stages.data import FrameSet, MaskSet, Tracking  # noqa: E402
from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking  # noqa: E402
from ophav_insta.deform import MeshDeformer, reference_meshes, unposed_vertices  # noqa: E402
from ophav_insta.field import build_trainer  # noqa: E402
from ophav_insta.hashgrid import (HashGrid, HashGridLayout, encoding_bytes, hash_encode_torch,  # noqa: E402
                                  position_rounding_bound, resolve_backend, tcnn_available, triton_available)
from ophav_insta.options import InstaOptions  # noqa: E402
from ophav_insta.phases import PhaseTimer  # noqa: E402
from ophav_insta.train import Scene, Stopwatch, psnr  # noqa: E402
from timing import median_time, synchronize  # noqa: E402


# ---------------------------------------------------------------------------------------------- hash encoding


def bench_encoding(device: torch.device, layout: HashGridLayout, points: int, iters: int) -> list[dict]:
    """Per backend: forward / forward+backward seconds, GB/s, max error against the float32 torch reference and
    against the exact float64 encoding (as a fraction of the float32 rounding bound)."""
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
    with torch.no_grad():
        exact = hash_encode_torch(x.double(), reference.table.double(), layout)
    bound = torch.as_tensor(position_rounding_bound(layout, float(reference.table.detach().abs().max())), device=device)
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
        level_error = (out.double() - exact).abs().reshape(points, layout.levels, -1).amax(dim=(0, 2))
        rows.append({
            "backend": name, "points": points, "forward_ms": fwd * 1e3, "forward_backward_ms": both * 1e3,
            "forward_GBps": encoding_bytes(layout, points, False) / fwd / 1e9,
            "forward_backward_GBps": encoding_bytes(layout, points, True) / both / 1e9,
            "max_abs_error": float((out - ref_out).abs().max()),
            "max_rel_error": float((out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-12)),
            "error_over_rounding_bound": float((level_error / bound).max()),
            "grad_max_rel_error": float((grid.table.grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12)),
        })
    return rows


def print_encoding(rows: list[dict], layout: HashGridLayout, points: int) -> None:
    print(f"\nhash encoding: {layout.levels} levels x {layout.features} features, 2^{layout.log2_table} table, "
          f"{points} points")
    print(f"{'backend':8s} {'fwd ms':>8s} {'fwd GB/s':>9s} {'f+b ms':>8s} {'f+b GB/s':>9s} {'max rel err':>12s} "
          f"{'err/bound':>10s} {'grad rel err':>12s}")
    for r in rows:
        print(f"{r['backend']:8s} {r['forward_ms']:8.3f} {r['forward_GBps']:9.1f} {r['forward_backward_ms']:8.3f} "
              f"{r['forward_backward_GBps']:9.1f} {r['max_rel_error']:12.2e} {r['error_over_rounding_bound']:10.3f} "
              f"{r['grad_max_rel_error']:12.2e}")
    print("  max rel err: against the float32 torch reference; err/bound: largest per-level error against the "
          "exact float64 encoding over hashgrid.position_rounding_bound (float32 rounding of grid positions; "
          "<= 1 is correct)")


# ---------------------------------------------------------------------------------------------- deformation


def bench_deform(device: torch.device, tracking: Tracking, options: InstaOptions, points: int, iters: int) -> list[dict]:
    """torch reference vs the fused triton kernel on ``points`` samples (70% within 5% of the head size of the
    frame meshes, 30% uniform in the grid box), with the training's candidate grid settings."""
    unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
    size = float(np.ptp(tracking.canonical_vertices, axis=0).max())
    deformer = MeshDeformer.build(tracking.canonical_vertices, tracking.faces,
                                  reference_meshes(unposed, tracking.canonical_vertices), options.candidate_grid,
                                  options.candidates, options.deform_near * size, options.deform_far * size, device)
    meshes = torch.as_tensor(unposed[:8], device=device)
    gen = torch.Generator(device).manual_seed(0)
    near = int(points * 0.7)
    verts = meshes.reshape(-1, 3)
    surface = verts[torch.randint(0, verts.shape[0], (near,), generator=gen, device=device)]
    surface = surface + torch.randn(near, 3, generator=gen, device=device) * 0.05 * size
    box = deformer.grid_min + torch.rand(points - near, 3, generator=gen, device=device) * (deformer.grid_max - deformer.grid_min)
    x = torch.cat([surface, box])
    frame = torch.randint(0, meshes.shape[0], (points,), generator=gen, device=device)
    rows, reference = [], None
    names = ["torch"] + (["triton"] if device.type == "cuda" and triton_available() else [])
    for name in names:
        deformer.set_backend(name)
        seconds = median_time(lambda: deformer.deform(x, frame, meshes), device, iters, 2)
        out = deformer.deform(x, frame, meshes)
        row = {"backend": name, "points": points, "ms": seconds * 1e3, "Mpoints_per_s": points / seconds / 1e6,
               "K": options.candidates, "grid": options.candidate_grid}
        sub = slice(0, 1 << 18)
        if reference is None:
            reference = out
            ref_near = deformer.nearest(x[sub], frame[sub], meshes)
        else:
            # Equal distances (closest point on a shared edge or vertex) may round to another of the tied
            # triangles on the GPU: compare points only where the triangle agrees, and check the others are ties.
            _, _, face, dist = deformer.deform_triton(x[sub], frame[sub], meshes, with_face=True)
            same = face.long() == ref_near.face
            row.update({"max_point_error_over_size": float((out[0][sub] - reference[0][sub])[same].abs().max()) / size,
                        "max_closeness_error": float((out[1] - reference[1]).abs().max()),
                        "max_distance_error_over_size": float((dist - ref_near.distance).abs().max()) / size,
                        "other_triangle_fraction": float(1.0 - same.float().mean())})
        rows.append(row)
    return rows


def print_deform(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\ndeformation: {r0['points']} points, candidate grid {r0['grid']}^3, K={r0['K']} candidates per point")
    print(f"{'backend':8s} {'ms':>9s} {'Mpts/s':>8s} {'speed-up':>9s}  agreement with torch")
    for r in rows:
        agree = ("(reference)" if "max_point_error_over_size" not in r else
                 f"same triangle: max |dx|/size {r['max_point_error_over_size']:.1e}; all: max |d distance|/size "
                 f"{r['max_distance_error_over_size']:.1e}, max |d closeness| {r['max_closeness_error']:.1e}; "
                 f"another tied triangle for {r['other_triangle_fraction']:.2%}")
        print(f"{r['backend']:8s} {r['ms']:9.3f} {r['Mpoints_per_s']:8.1f} {r0['ms'] / r['ms']:8.1f}x  {agree}")


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


def warm_trainer(options: InstaOptions, device: torch.device, frames, masks, tracking, warmup: int, total: int):
    backend = resolve_backend(options.backend, device)
    start = time.perf_counter()
    trainer, _ = build_trainer(options, frames, masks, tracking, device, 0, backend, total)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.step()
    synchronize(device)
    return trainer, backend, setup, time.perf_counter() - start


def bench_training(options: InstaOptions, device: torch.device, frames, masks, tracking, warmup: int, iters: int,
                   render_iters: int) -> dict:
    trainer, backend, setup, warm_seconds = warm_trainer(options, device, frames, masks, tracking, warmup,
                                                         warmup + iters)
    trainer.reset_stats()
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
        "backend": backend, "deform_backend": trainer.deformer.backend, "compile": bool(options.compile),
        "setup_s": setup, "warmup_s": warm_seconds, "batch_rays": trainer.options.batch_rays,
        "iterations_timed": iters, "iterations_per_s": iters / seconds, "ms_per_iteration": seconds / iters * 1e3,
        "samples_per_ray": trainer.samples_evaluated / max(trainer.rays_traced, 1),
        "capacity_per_ray": (trainer.capacity / trainer._rays_per_batch()) if trainer.capacity else None,
        "samples_dropped": trainer.samples_dropped, "occupied_fraction": trainer.occupancy.fraction(),
        "train_batch_psnr": train_psnr, "render_ms": render_seconds * 1e3, "render_fps": 1.0 / render_seconds,
        "render_psnr": render_psnr, "render_size": list(frames.size),
    }


def print_training(t: dict, size: int, num_frames: int) -> None:
    mode = "compile" if t["compile"] else "eager"
    capacity = f", capacity {t['capacity_per_ray']:.1f}/ray" if t["capacity_per_ray"] else ""
    print(f"\ntraining {size}x{size}, {num_frames} frames, {t['batch_rays']} rays/batch ({mode}; hash {t['backend']}, "
          f"deform {t['deform_backend']}): {t['iterations_per_s']:.1f} it/s = {t['ms_per_iteration']:.2f} ms/it, "
          f"{t['samples_per_ray']:.1f} samples/ray evaluated{capacity}, dropped {t['samples_dropped']}, "
          f"occupied {t['occupied_fraction']:.1%}, batch PSNR {t['train_batch_psnr']:.1f} dB "
          f"(setup {t['setup_s']:.1f} s, warm-up {t['warmup_s']:.1f} s)")
    print(f"render {size}x{size} ({mode}): {t['render_ms']:.1f} ms = {t['render_fps']:.1f} fps "
          f"(PSNR vs its training frame {t['render_psnr']:.1f} dB)")


# ---------------------------------------------------------------------------------------------- profile


def _sort_key(device: torch.device) -> str:
    return "cuda_time_total" if device.type == "cuda" else "cpu_time_total"


def _kernel_ms(prof) -> float:
    """Sum of GPU activity (kernels, copies, memsets) in the profile, without annotation ranges."""
    from torch.autograd import DeviceType

    total = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
            continue
        if event.name.startswith(("phase:", "ProfilerStep", "##")) or "#" in event.name:
            continue
        total += event.time_range.elapsed_us()
    return total / 1e3


def _profile(run: Callable[[], object], device: torch.device, title: str, report: dict, unit: int = 1,
             unit_name: str = "run") -> None:
    """torch.profiler over one ``run`` (``unit`` steps): top 25 ops, and the GPU kernel time per ``unit_name``
    against the wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    wall = (time.perf_counter() - start) / unit * 1e3
    print(f"\n-- {title}: torch.profiler over {unit} {unit_name}(s), top 25 ops by {_sort_key(device)} "
          f"(totals over all {unit}; wall {wall:.2f} ms per {unit_name} under the profiler, which adds host overhead) --")
    try:
        table = prof.key_averages().table(sort_by=_sort_key(device), row_limit=25)
    except Exception:  # noqa: BLE001 (older/newer key names)
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
    print(table)
    entry = {"wall_ms_under_profiler": wall, "per": unit_name, "table": table}
    if device.type == "cuda":
        busy = _kernel_ms(prof) / unit
        entry["gpu_busy_ms"] = busy
        verdict = ("the GPU idles most of the time: host/launch bound (fewer, larger kernels help; a faster GPU "
                   "does not)" if busy < 0.6 * wall else "mostly GPU bound (faster kernels help)")
        print(f"GPU busy {busy:.2f} ms per {unit_name} (sum of kernel/copy times) of {wall:.2f} ms wall "
              f"= {busy / wall:.0%}: {verdict}")
    report[f"{title}: profiler"] = entry


def _phase_table(run: Callable[[], object], device: torch.device, repeats: int, title: str, report: dict,
                 unit: int = 1, unit_name: str = "run") -> None:
    """Per-phase times of ``repeats`` runs, pipelined (as in real use) and serialized (sync between phases),
    reported per ``unit_name`` (one run holds ``unit`` of them)."""
    cuda = device.type == "cuda"
    results = {}
    for mode in ("pipelined", "serialized"):
        timer = PhaseTimer(cuda, serialize=(mode == "serialized"))
        synchronize(device)
        start = time.perf_counter()
        with timer:
            for _ in range(repeats):
                run()
            synchronize(device)
        count = repeats * unit
        wall = (time.perf_counter() - start) / count * 1e3
        phases = {name: {key: value / count for key, value in entry.items()} for name, entry in timer.summary().items()}
        results[mode] = {"wall_ms": wall, "phases": phases, "per": unit_name}
    pipe, ser = results["pipelined"], results["serialized"]
    nan = float("nan")
    print(f"\n-- {title}: phases, ms per {unit_name} (mean over {repeats * unit}) --")
    print(f"wall per {unit_name}: {pipe['wall_ms']:.2f} ms pipelined (as in real use), {ser['wall_ms']:.2f} ms "
          f"serialized (sync at every phase boundary)")
    print(f"{'phase':20s} {'calls':>6s} {'host ms':>8s} {'GPU ms':>8s} {'serial ms':>10s} {'% of serial':>11s}")
    names = list(dict.fromkeys(list(pipe["phases"]) + list(ser["phases"])))
    key = "gpu_ms" if cuda else "host_ms"
    serial_total = sum(ser["phases"].get(n, {}).get(key, 0.0) for n in names)
    for name in names:
        p, q = pipe["phases"].get(name, {}), ser["phases"].get(name, {})
        serial = q.get(key, nan)
        print(f"{name:20s} {p.get('calls', 0):6.2f} {p.get('host_ms', nan):8.2f} {p.get('gpu_ms', nan):8.2f} "
              f"{serial:10.2f} {serial / max(serial_total, 1e-9):11.1%}")
    host_sum = sum(p.get("host_ms", 0.0) for p in pipe["phases"].values())
    print(f"{'(outside phases)':20s} {'':6s} {pipe['wall_ms'] - host_sum:8.2f}")
    print("  calls: regions per " + unit_name + "; host ms: Python + launch time spent issuing the phase (pipelined "
          "run); GPU ms: time between the phase's first and last kernel boundary on the GPU in the pipelined run "
          "(includes the GPU waiting for the host when host bound); serial ms: the phase alone with the GPU drained "
          "before and after it (its cost if nothing overlapped). host ms close to GPU ms everywhere = launch bound.")
    report[f"{title}: phases"] = results


def profile_mode(options: InstaOptions, device: torch.device, frames, masks, tracking, warmup: int, steps: int,
                 report: dict) -> None:
    trainer, backend, _, _ = warm_trainer(options, device, frames, masks, tracking, warmup, warmup + 10 * steps)
    print(f"\nprofile after {warmup} warm-up steps: hash {backend}, deform {trainer.deformer.backend}, "
          f"compile {options.compile}, {trainer._rays_per_batch()} rays x {options.samples_per_ray} samples/batch, "
          f"capacity {trainer.capacity} field evaluations/step, occupied {trainer.occupancy.fraction():.1%}")
    sections: dict = {}
    # Timed runs of one occupancy update interval (16 steps), so the update is counted at its rate.
    per_run = options.occupancy_update_every
    runs = max(1, steps // per_run)

    def train_run():
        for _ in range(per_run):
            trainer.step()

    title = "training"
    for section, fn in (("training phases", lambda: _phase_table(train_run, device, runs, title, sections, per_run, "step")),
                        ("training profiler", lambda: _profile(train_run, device, title, sections, per_run, "step"))):
        try:
            fn()
        except Exception:  # noqa: BLE001 (report and go on: the other sections still say something)
            print(f"{section} failed:\n{traceback.format_exc()}")
    trainer.finalize()
    index = len(frames) // 2

    def render():
        trainer.render_frame(index)

    render()
    render()
    title = f"render (one {frames.size[0]}x{frames.size[1]} image)"
    for section, fn in (("render phases", lambda: _phase_table(render, device, 3, title, sections, 1, "image")),
                        ("render profiler", lambda: _profile(render, device, title, sections, 1, "image"))):
        try:
            fn()
        except Exception:  # noqa: BLE001
            print(f"{section} failed:\n{traceback.format_exc()}")
    report["profile"] = sections


def quality(options: InstaOptions, device: torch.device, folder: Path, checkpoints: list[int], every: int,
            eval_frames: int, sheet_dir: Path | None = None) -> dict:
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
        full, head, tiles = [], [], []
        for i in pick:
            rgb, _ = trainer.render_frame(int(i), held_scene)
            target = trainer.target(int(i), held_scene)
            if len(tiles) < 8:  # ground truth beside the render, for a person to compare
                to_u8 = lambda t: (t.clamp(0, 1) * 255).byte().cpu().numpy()  # noqa: E731
                tiles += [to_u8(target), to_u8(rgb)]
            err = ((rgb - target) ** 2).mean(dim=-1)
            mask = held_scene.masks[int(i)] > 127
            full.append(float(err.mean()))
            head.append(float(err[mask].mean()) if bool(mask.any()) else float("nan"))
        results.append({"iterations": step, "train_seconds": elapsed, "heldout_psnr": psnr(float(np.mean(full))),
                        "heldout_psnr_head": psnr(float(np.nanmean(head))), "frames": int(len(pick))})
        print(f"  {step:>7d} it  {elapsed:7.1f} s  held-out PSNR {results[-1]['heldout_psnr']:.2f} dB "
              f"(head {results[-1]['heldout_psnr_head']:.2f} dB)", flush=True)
        if sheet_dir is not None:
            import cv2

            sheet = np.concatenate([np.concatenate(tiles[k:k + 2], axis=1) for k in range(0, len(tiles), 2)], axis=0)
            sheet = cv2.resize(sheet, (sheet.shape[1] // 2, sheet.shape[0] // 2), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(sheet_dir / f"heldout_{step}.jpg"), sheet[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
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
    parser.add_argument("--deform-points", type=int, default=None, help="deformation batch (2^20 on CUDA)")
    parser.add_argument("--log2-table", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "tcnn"])
    parser.add_argument("--deform-backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--compile", default=None, choices=["off", "on", "both"],
                        help="torch.compile for training/render: both (default on CUDA: eager and compiled rows), "
                             "on, off (default on the CPU)")
    parser.add_argument("--profile", action="store_true", help="where the time goes (see the module docstring)")
    parser.add_argument("--profile-steps", type=int, default=32, help="training steps per phase measurement (the "
                        "profiler traces one occupancy interval, 16 steps)")
    parser.add_argument("--quality", type=Path, default=None, help="dataset folder: run the quality mode")
    parser.add_argument("--quality-iters", type=int, nargs="+", default=[2000, 5000, 10000])
    parser.add_argument("--holdout-every", type=int, default=10)
    parser.add_argument("--eval-frames", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if cuda else "off")]
    options = InstaOptions(batch_rays=args.batch_rays if cuda else min(args.batch_rays, 512), backend=args.backend,
                           deform_backend=args.deform_backend, amp=not args.no_amp,
                           compile=bool(args.profile and args.compile == "on"),
                           log2_table=args.log2_table if args.log2_table else (19 if cuda else 14),
                           **({} if cuda else {"samples_per_ray": 32, "candidate_grid": 12, "occupancy_resolution": 32,
                                               "occupancy_warmup": 60})).resolved(cuda)
    report: dict = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
                    "triton": _version("triton"), "options": options.model_dump()}
    print(f"device: {name}  torch {torch.__version__}  triton {report['triton']}  python {report['python']}  "
          f"hash backend {resolve_backend(options.backend, device)}", flush=True)
    size = args.size or (512 if cuda else 64)
    warmup = args.train_warmup if args.train_warmup is not None else (400 if cuda else 70)

    if args.quality is not None:
        report["quality"] = quality(options, device, args.quality, sorted(args.quality_iters), args.holdout_every,
                                    args.eval_frames, sheet_dir=args.out.parent if args.out else None)
    elif args.profile:
        frames, masks, tracking = synthetic_dataset(args.frames if cuda else 8, size)
        profile_mode(options, device, frames, masks, tracking, warmup, args.profile_steps if cuda else 16, report)
    else:
        layout = HashGridLayout(options.levels, options.features_per_level, options.log2_table,
                                options.base_resolution, options.finest_resolution)
        points = args.points or (1 << 18 if cuda else 1 << 12)
        report["encoding"] = bench_encoding(device, layout, points, 20 if cuda else 2)
        print_encoding(report["encoding"], layout, points)
        frames, masks, tracking = synthetic_dataset(args.frames if cuda else 8, size)
        deform_points = args.deform_points or (1 << 20 if cuda else 1 << 14)
        report["deform"] = bench_deform(device, tracking, options, deform_points, 10 if cuda else 2)
        print_deform(report["deform"])
        iters = args.train_iters if args.train_iters is not None else (300 if cuda else 10)
        report["training"] = []
        for compiled in compile_modes:
            try:
                row = bench_training(options.model_copy(update={"compile": compiled}), device, frames, masks,
                                     tracking, warmup, iters, args.render_iters if cuda else 1)
            except Exception:  # noqa: BLE001 (a torch.compile failure must not hide the eager numbers)
                print(f"\ntraining with compile={compiled} failed:\n{traceback.format_exc()}")
                continue
            report["training"].append(row)
            print_training(row, size, len(frames))
        print("  targets on the H100: >= 100 it/s at 4096 rays/batch, >= 30 fps at 512x512")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.out}")


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
