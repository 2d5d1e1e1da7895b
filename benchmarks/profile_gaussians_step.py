"""Where a training step of the ``gaussians`` field spends its time, on a real video (CUDA).

One command (on the GPU machine; the dataset is made by ``bench_gaussians.py`` or ``ophav preprocess``)::

    python3 benchmarks/profile_gaussians_step.py --work /tmp/nod175_512 --warmup 3000 --out /tmp/out/profile

1. Trains ``--warmup`` iterations of the standard schedule (so the Gaussian count and the SH degree are those of a
   real training at that point), then times ``--timed`` steps with only a synchronisation at the ends: it/s.
2. Profiles ``--profiled`` more steps with ``torch.profiler`` and named ranges around the phases of a step (loss,
   densification statistics, optimizer, EMA, densification; the rest is the backward). Prints, per phase, the
   host time and the GPU time of the kernels it launched, then the kernels by GPU time and the operators by host time; the GPU's busy share of the
   wall time (the kernels' time over the steps' wall time) says whether a step is bound by the GPU or by
   launching work on it. Writes ``profile.json`` (the tables) and ``trace.json`` (a Chrome trace) under ``--out``.

``--set OPTION=VALUE`` overrides a GaussianOptions option, as in ``bench_gaussians.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("loss", "accumulate", "optimizer", "ema", "densify")


def instrument(trainer, record) -> None:
    """Put the phases of ``trainer.step()`` in named ranges: its loss (with graphs on, ``--set
    cuda_graphs=true``, the two graph replays around the rasteriser; otherwise the step through ``render_views``),
    the densification statistics, Adam, the EMA and densification. What a step spends outside them is the
    backward."""
    def wrapped(owner, name: str, phase: str) -> None:
        method = getattr(owner, name)

        def call(*args, **kwargs):
            with record(phase):
                return method(*args, **kwargs)

        setattr(owner, name, call)

    for name, phase in (("loss", "loss"), ("_accumulate", "accumulate"), ("_update_ema", "ema"),
                        ("densify_and_prune", "densify")):
        wrapped(trainer, name, phase)
    wrapped(trainer.optimizer, "step", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="dataset folder (frames/masks/tracking.npz)")
    parser.add_argument("--video", type=Path, default=None, help="video to preprocess when --work holds none")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--profile", default="standard", help="profile whose option defaults the training uses")
    parser.add_argument("--iterations", type=int, default=6500, help="the schedule's length (learning-rate decay, "
                        "densification window)")
    parser.add_argument("--warmup", type=int, default=3000)
    parser.add_argument("--timed", type=int, default=300)
    parser.add_argument("--profiled", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on a small dataset")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gaussians import load_or_preprocess, split
    from ophav_core.config import parse_value
    from ophav_gaussians.field import build_trainer
    from ophav_gaussians.options import GaussianOptions
    from ophav_gaussians.train import resolve_backend

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    options = GaussianOptions(**{k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)})
    frames, masks, tracking = load_or_preprocess(args.video, args.work, args.size)
    train, _ = split(frames, masks, tracking, 10)
    trainer, _ = build_trainer(options, args.profile, *train, device, 0, resolve_backend("auto", device),
                               args.iterations)
    started = time.perf_counter()
    for _ in range(args.warmup):
        trainer.step()
    sync()
    print(f"warm-up: {args.warmup} it in {time.perf_counter() - started:.1f} s, {len(trainer)} Gaussians, "
          f"SH degree {trainer.degree}", flush=True)
    sync()
    started = time.perf_counter()
    for _ in range(args.timed):
        trainer.step()
    sync()
    plain = args.timed / (time.perf_counter() - started)
    print(f"timed: {plain:.1f} it/s over {args.timed} steps", flush=True)

    instrument(trainer, record_function)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sync()
        wall_start = time.perf_counter()
        for _ in range(args.profiled):
            with record_function("step"):
                trainer.step()
        sync()
        wall = time.perf_counter() - wall_start
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / "trace.json"))

    # Per phase: host time of the range, GPU time of the kernels launched inside it (by correlation in the trace).
    events = json.loads((args.out / "trace.json").read_text())["traceEvents"]
    ranges = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") in PHASES + ("step",)]
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    kernels = [e for e in events if e.get("cat") == "kernel"]
    host = defaultdict(float)
    for r in ranges:
        host[r["name"]] += r["dur"]
    gpu = defaultdict(float)
    count = defaultdict(int)
    by_thread = defaultdict(list)
    for r in ranges:
        if r["name"] != "step":
            by_thread[r["tid"]].append(r)
    for k in kernels:
        launch = launches.get(k["args"].get("correlation"))
        phase = "other"
        if launch is not None:
            for r in by_thread.get(launch["tid"], ()):
                if r["ts"] <= launch["ts"] <= r["ts"] + r["dur"]:
                    phase = r["name"]
                    break
            else:  # outside every phase: the backward (autograd runs it on its own thread on CUDA)
                phase = "backward"
        gpu[phase] += k["dur"]
        count[phase] += 1
    busy = sum(k["dur"] for k in kernels) / 1e6
    host["backward"] = host["step"] - sum(host[p] for p in PHASES)  # the step's host time outside the phases
    rows = [{"phase": p, "host_ms_per_step": round(host[p] / 1e3 / args.profiled, 3),
             "gpu_ms_per_step": round(gpu[p] / 1e3 / args.profiled, 3),
             "kernels_per_step": round(count[p] / args.profiled, 1)} for p in PHASES + ("backward", "other")]
    print(f"profiled: {args.profiled} steps in {wall:.3f} s ({args.profiled / wall:.1f} it/s under the profiler); "
          f"GPU busy {busy:.3f} s = {100 * busy / wall:.0f}% of the wall; "
          f"{len(kernels) / args.profiled:.0f} kernels a step", flush=True)
    print(f"{'phase':<14}{'host ms':>9}{'GPU ms':>9}{'kernels':>9}")
    for row in rows:
        print(f"{row['phase']:<14}{row['host_ms_per_step']:>9.3f}{row['gpu_ms_per_step']:>9.3f}"
              f"{row['kernels_per_step']:>9.1f}")
    kernel_time = defaultdict(float)
    kernel_calls = defaultdict(int)
    for k in kernels:
        kernel_time[k["name"]] += k["dur"]
        kernel_calls[k["name"]] += 1
    top = sorted(kernel_time.items(), key=lambda kv: -kv[1])[:30]
    print("\nkernels by GPU time (ms per step, calls per step):")
    for name, dur in top:
        print(f"{dur / 1e3 / args.profiled:8.3f} {kernel_calls[name] / args.profiled:6.1f}  {name[:110]}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    print("\noperators by host time:\n" + table)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "options": trainer.options.model_dump(), "gaussians": len(trainer), "sh_degree": trainer.degree,
              "warmup": args.warmup, "it_per_s": round(plain, 1), "profiled_steps": args.profiled,
              "profiled_it_per_s": round(args.profiled / wall, 1), "gpu_busy_share": round(busy / wall, 3),
              "kernels_per_step": round(len(kernels) / args.profiled, 1), "phases": rows,
              "top_kernels": [{"name": n, "ms_per_step": round(d / 1e3 / args.profiled, 4),
                               "calls_per_step": kernel_calls[n] / args.profiled} for n, d in top]}
    (args.out / "profile.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "operators.txt").write_text(table)
    print(f"wrote {args.out}/profile.json, trace.json, operators.txt")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
