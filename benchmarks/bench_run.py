"""Where a whole `ophav run` spends its time: per-step wall time, GPU utilisation and memory sampled over the run,
the it/s of each training phase, written as a markdown table, a JSON file and a timeline plot.

    python benchmarks/bench_run.py run PORTRAIT RUN_DIR [--profile standard] [--device cuda] [-- EXTRA ophav run ARGS]
    python benchmarks/bench_run.py start PORTRAIT RUN_DIR ...   # detached (a run longer than one device call)
    python benchmarks/bench_run.py wait RUN_DIR [--seconds 540] # returns when it finished or after SECONDS
    python benchmarks/bench_run.py report RUN_DIR [--out DIR]   # table + timeline of a finished run

The sampler reads NVML (``nvidia-ml-py``) when it imports, else polls ``nvidia-smi``; on a machine without a GPU
it records the CPU load of the run's process tree instead (from /proc). Samples go to RUN_DIR/bench_samples.csv
while the run goes, so an interrupted run still has its timeline. Step times come from the run's own manifest
(`started` / `seconds` per step), training figures from each checkpoint's info (iterations, seconds, it/s).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SAMPLES = "bench_samples.csv"
RUN_LOG = "bench_run.log"
DONE = "bench_done.json"


# ---------------------------------------------------------------------------------------------- sampling


class GpuSampler:
    """Utilisation (%) and memory (MiB) of GPU 0: NVML when importable, else one nvidia-smi call per sample."""

    def __init__(self):
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # no NVML: nvidia-smi, or nothing
            self.name = self._smi("name") if shutil.which("nvidia-smi") else ""

    @staticmethod
    def _smi(query: str) -> str:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    @property
    def available(self) -> bool:
        return bool(self.name)

    def sample(self) -> tuple[float, float]:
        if self.nvml is not None:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            return float(util.gpu), memory.used / 2 ** 20
        util, memory = self._smi("utilization.gpu,memory.used").split(",")
        return float(util), float(memory)


def _tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, parent = int(entry.name), int(fields[1])
        children.setdefault(parent, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def sample_until_done(process: subprocess.Popen, path: Path, interval: float) -> None:
    gpu = GpuSampler()
    start = time.time()
    last_cpu, last_time = 0.0, start
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "gpu_util", "gpu_mem_mib", "cpu_cores"])
        while process.poll() is None:
            now = time.time()
            cpu = _tree_cpu_seconds(process.pid)
            cores = (cpu - last_cpu) / max(now - last_time, 1e-6)
            last_cpu, last_time = cpu, now
            util, memory = gpu.sample() if gpu.available else (float("nan"), float("nan"))
            writer.writerow([f"{now:.3f}", util, f"{memory:.0f}", f"{cores:.2f}"])
            handle.flush()
            time.sleep(interval)


def ophav_command(portrait: str, run_dir: Path, profile: str, device: str, extra: list[str]) -> list[str]:
    exe = shutil.which("ophav")
    head = [exe] if exe else [sys.executable, "-m", "ophav_core.cli"]
    return head + ["run", portrait, "--profile", profile, "--device", device, "--out", str(run_dir), *extra]


def run_and_sample(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DONE).unlink(missing_ok=True)
    command = ophav_command(args.portrait, run_dir, args.profile, args.device, args.extra)
    started = time.time()
    with (run_dir / RUN_LOG).open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        sample_until_done(process, run_dir / SAMPLES, args.interval)
    code = process.wait()
    (run_dir / DONE).write_text(json.dumps({"exit": code, "wall_s": round(time.time() - started, 1),
                                            "command": command, "started": started}))
    return code


# ---------------------------------------------------------------------------------------------- report


def _parse_time(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def training_info(run_dir: Path, step: str) -> dict | None:
    """The info of the checkpoint a training step wrote (fit/, roundN/)."""
    ckpt = run_dir / ("fit" if step == "fit" else step.replace("refit", "round")) / "avatar.ckpt"
    if not ckpt.exists():
        return None
    try:
        import torch

        info = torch.load(ckpt, map_location="cpu", weights_only=True).get("info", {})
    except Exception:
        return None
    return {k: info.get(k) for k in ("iterations", "seconds", "iterations_per_second", "psnr", "device")}


def report(run_dir: Path, out: Path | None) -> dict:
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    done = json.loads((run_dir / DONE).read_text()) if (run_dir / DONE).exists() else {}
    samples = []
    if (run_dir / SAMPLES).exists():
        with (run_dir / SAMPLES).open() as handle:
            for row in csv.DictReader(handle):
                samples.append({k: float(v) for k, v in row.items()})
    gpu = GpuSampler() if samples and samples[0]["gpu_util"] == samples[0]["gpu_util"] else None
    card = (gpu.name if gpu else "") or "no GPU"
    steps = []
    for name, step in manifest.get("steps", {}).items():
        if "started" not in step or "seconds" not in step:
            continue
        begin = _parse_time(step["started"])
        end = begin + float(step["seconds"])
        inside = [s for s in samples if begin <= s["time"] <= end]
        mean = lambda key: (sum(s[key] for s in inside) / len(inside)) if inside else float("nan")  # noqa: E731
        row = {"step": name, "status": step.get("status"), "seconds": float(step["seconds"]), "begin": begin,
               "gpu_util": mean("gpu_util"), "gpu_mem_mib": max((s["gpu_mem_mib"] for s in inside), default=float("nan")),
               "cpu_cores": mean("cpu_cores"), "samples": len(inside)}
        if name == "fit" or name.startswith("refit"):
            row["training"] = training_info(run_dir, name)
        steps.append(row)
    total = sum(r["seconds"] for r in steps)
    result = {"run_dir": str(run_dir), "card": card, "date": dt.date.today().isoformat(),
              "profile": manifest.get("config", {}).get("profile"), "device": manifest.get("device"),
              "wall_s": done.get("wall_s"), "steps_s": round(total, 1), "steps": steps}
    (out / "bench_run.json").write_text(json.dumps(result, indent=1))
    lines = [f"`ophav run` {result['profile']} on {card} ({result['device']}), {result['date']}: wall "
             f"{result['wall_s']} s (process, imports included), steps {result['steps_s']} s", "",
             "| step | s | share | GPU util % (mean) | GPU mem MiB (peak) | CPU cores (mean) | training |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in steps:
        t = r.get("training") or {}
        training = (f"{t.get('iterations')} it, {t.get('iterations_per_second')} it/s, {t.get('psnr', 0) or 0:.2f} dB"
                    if t else "")
        lines.append(f"| {r['step']} | {r['seconds']:.1f} | {r['seconds'] / max(total, 1e-9):.0%} | "
                     f"{r['gpu_util']:.0f} | {r['gpu_mem_mib']:.0f} | {r['cpu_cores']:.2f} | {training} |")
    table = "\n".join(lines)
    (out / "bench_run.md").write_text(table + "\n")
    print(table)
    if samples:
        timeline(samples, steps, out / "bench_run_timeline.png", f"{result['profile']} run on {card}")
    return result


def timeline(samples: list[dict], steps: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = samples[0]["time"]
    t = [s["time"] - t0 for s in samples]
    has_gpu = samples[0]["gpu_util"] == samples[0]["gpu_util"]
    fig, ax = plt.subplots(figsize=(12, 4))
    if has_gpu:
        ax.plot(t, [s["gpu_util"] for s in samples], lw=0.8, label="GPU utilisation %")
        ax.set_ylim(0, 105)
    ax.plot(t, [s["cpu_cores"] * (100 if has_gpu else 1) / (1 if not has_gpu else os.cpu_count() or 1)
                for s in samples], lw=0.8, label="CPU (% of all cores)" if has_gpu else "CPU cores busy")
    colours = plt.get_cmap("tab20")
    for i, step in enumerate(steps):
        begin = step["begin"] - t0
        ax.axvspan(begin, begin + step["seconds"], color=colours(i % 20), alpha=0.25, lw=0)
        if step["seconds"] > 0.03 * (t[-1] or 1):
            ax.text(begin + step["seconds"] / 2, ax.get_ylim()[1] * 0.95, step["step"], ha="center", va="top",
                    fontsize=8, rotation=90)
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "start"):
        p = sub.add_parser(name)
        p.add_argument("portrait")
        p.add_argument("run_dir")
        p.add_argument("--profile", default="standard")
        p.add_argument("--device", default="auto")
        p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
        p.add_argument("--out", type=Path, default=None, help="where the table and plot go (default RUN_DIR)")
    p = sub.add_parser("wait")
    p.add_argument("run_dir")
    p.add_argument("--seconds", type=float, default=540)
    p = sub.add_parser("report")
    p.add_argument("run_dir")
    p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.extra = extra
    if args.command == "run":
        code = run_and_sample(args)
        report(Path(args.run_dir), args.out)
        return code
    if args.command == "start":
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        child = [sys.executable, __file__, "run", args.portrait, args.run_dir, "--profile", args.profile,
                 "--device", args.device, "--interval", str(args.interval)]
        if args.out:
            child += ["--out", str(args.out)]
        if extra:
            child += ["--", *extra]
        subprocess.Popen(child, stdout=open(Path(args.run_dir) / "bench_driver.log", "w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
        print(f"started: {' '.join(child)}")
        return 0
    if args.command == "wait":
        run_dir, deadline = Path(args.run_dir), time.time() + args.seconds
        while time.time() < deadline and not (run_dir / DONE).exists():
            time.sleep(5)
        log = run_dir / RUN_LOG
        if log.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if not line.startswith(("W0000", "I0000"))]
            print("\n".join(tail[-6:]))
        print("done" if (run_dir / DONE).exists() else "still running")
        return 0
    report(Path(args.run_dir), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
