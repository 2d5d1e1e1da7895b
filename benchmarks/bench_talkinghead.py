"""Frames per second of the talking-head generators (face-vid2vid, FOMM) with random weights at 256x256.

Measures the per-frame work of generation as the components do it, after the portrait is encoded once:
face-vid2vid = keypoint posing + generator.decode; FOMM = keypoint detection of the driving frames +
generator.decode. Uses CUDA when present, else the CPU (slow: one timed iteration).

    python benchmarks/bench_talkinghead.py [--batch-sizes 1 8] [--iters 10] [--bf16]

Needs only torch (no pydantic): it imports the network modules, not the components.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import torch  # noqa: E402

from ophav_talkinghead.fomm_net import build_fomm  # noqa: E402
from ophav_talkinghead.fv2v_net import (bins_to_degrees, build_facevid2vid, posed_keypoints,  # noqa: E402
                                        rotation_matrix)
from timing import median_time  # noqa: E402

SIZE = 256


def facevid2vid_step(device: torch.device, batch: int, decoder: str) -> Callable[[], torch.Tensor]:
    nets = build_facevid2vid(decoder=decoder)
    for module in nets.modules().values():
        module.to(device)
    source = torch.rand(1, 3, SIZE, SIZE, device=device)
    with torch.inference_mode():
        canonical = nets.kp_detector(source)
        head = nets.he_estimator(source)
        angles = torch.stack([bins_to_degrees(head[k])[0] for k in ("yaw", "pitch", "roll")])
        kp_source = posed_keypoints(canonical, rotation_matrix(*angles[:, None]), head["t"], head["exp"])
        volume = nets.generator.encode(source)
    yaw = torch.linspace(-30, 30, batch, device=device)

    def step() -> torch.Tensor:
        with torch.inference_mode():
            rotation = rotation_matrix(angles[0] + yaw, angles[1].expand(batch), angles[2].expand(batch))
            kp_driving = posed_keypoints(canonical.expand(batch, -1, -1), rotation, head["t"].expand(batch, -1),
                                         head["exp"].expand(batch, -1, -1))
            return nets.generator.decode(volume, kp_driving, kp_source.expand(batch, -1, -1))

    return step


def fomm_step(device: torch.device, batch: int) -> Callable[[], torch.Tensor]:
    nets = build_fomm()
    for module in nets.modules().values():
        module.to(device)
    source = torch.rand(1, 3, SIZE, SIZE, device=device)
    driving = torch.rand(batch, 3, SIZE, SIZE, device=device)
    with torch.inference_mode():
        kp_source = nets.kp_detector(source)
        encoded = nets.generator.encode(source)
    expand = lambda kp: {k: v.expand(batch, *v.shape[1:]) for k, v in kp.items()}  # noqa: E731

    def step() -> torch.Tensor:
        with torch.inference_mode():
            return nets.generator.decode(encoded, nets.kp_detector(driving), expand(kp_source))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 on CUDA, 1 on CPU)")
    parser.add_argument("--bf16", action="store_true", help="also time under bfloat16 autocast")
    parser.add_argument("--models", nargs="+", default=["facevid2vid-spade", "facevid2vid-original", "fomm"])
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    iters = args.iters or (10 if device.type == "cuda" else 1)
    warmup = 3 if device.type == "cuda" else 1
    torch.backends.cudnn.benchmark = True
    print(f"device: {name}  torch {torch.__version__}  input {SIZE}x{SIZE}  random weights  median of {iters}")
    print(f"{'model':<22}{'precision':<11}{'batch':>6}{'ms/batch':>11}{'frames/s':>10}{'peak MiB':>10}")
    precisions = ["fp32"] + (["bf16"] if args.bf16 else [])
    for model in args.models:
        for batch in args.batch_sizes:
            torch.manual_seed(0)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if model == "fomm":
                step = fomm_step(device, batch)
            else:
                step = facevid2vid_step(device, batch, decoder=model.split("-", 1)[1])
            for precision in precisions:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    seconds = median_time(step, device, iters, warmup)
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
                print(f"{model:<22}{precision:<11}{batch:>6}{seconds * 1000:>11.1f}"
                      f"{batch / seconds:>10.1f}{peak:>10.0f}")
            del step
    sys.stdout.flush()


if __name__ == "__main__":
    main()
