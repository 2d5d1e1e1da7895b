"""Rendering a fitted avatar on the CPU: seconds per frame of a yaw sweep, and where they go.

    python benchmarks/bench_render_cpu.py runs/astronaut/avatar/avatar.ckpt --size 128 --frames 8 [--out r.json]

One frame is rendered first and not timed (the first call loads the checkpoint and builds its grids); then
``--frames`` frames of a -45..45 degree yaw sweep are rendered as one request, as ``ophav render --views
turntable`` does, with the insta phase timer on (its regions add no synchronisation on the CPU). Prints seconds
per frame, frames/s and the per-phase host seconds; ``--out`` writes them as JSON with the machine's core count.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("avatar", type=Path, help="an avatar checkpoint (RUN/avatar/avatar.ckpt)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from ophav_core import api
    from ophav_core.pipeline import animate
    from ophav_core.stages.motion import Motion
    from ophav_insta.phases import PhaseTimer

    context = api.context(Path(os.environ.get("TMPDIR", "/tmp")) / "ophav-bench-render", "preview", "cpu",
                          quiet=True)
    field, _ = api.create("field", api.avatar_description(args.avatar).get("field", "insta"), context)
    avatar = field.load(args.avatar)
    resolution = (args.size, args.size)

    def sweep(count: int):
        yaw = np.linspace(-45.0, 45.0, count).astype(np.float32)
        zeros = np.zeros_like(yaw)
        return animate.requests_from_motion(avatar.template, Motion(25.0, yaw, zeros, zeros, {}),
                                            resolution=resolution)

    field.render(avatar, sweep(1))
    started = time.perf_counter()
    with PhaseTimer(False) as timer:
        field.render(avatar, sweep(args.frames))
    seconds = (time.perf_counter() - started) / args.frames
    phases = {name: round(v["host_ms"] / 1e3 / args.frames, 4) for name, v in timer.summary().items()}
    result = {"avatar": str(args.avatar), "size": args.size, "frames": args.frames,
              "seconds_per_frame": round(seconds, 4), "fps": round(1.0 / seconds, 3),
              "phase_seconds_per_frame": phases, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
