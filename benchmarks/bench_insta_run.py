"""Train insta on a run's own coarse video with every 10th frame held out: speed and held-out PSNR of option
variants, on the device the run would use. For choosing device defaults on real data (the synthetic head of
bench_insta.py has no hair and no background):

    python benchmarks/bench_insta_run.py runs/astronaut --steps 900 --variant occupancy_update_every=16 \\
        --variant occupancy_update_every=64
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def train_variant(run: Path, steps: int, device: str, overrides: dict, holdout: int = 10) -> dict:
    from ophav_core.config import parse_value
    from ophav_core.stages import FrameSet, MaskSet, Tracking
    from ophav_insta.field import build_trainer
    from ophav_insta.options import InstaOptions
    from ophav_insta.train import Scene, psnr

    frames = FrameSet.load(run / "image2video/frames.npz")
    masks = MaskSet.load(run / "segment/masks.npz")
    tracking = Tracking.load(run / "track/tracking.npz")
    held = np.arange(len(frames)) % holdout == holdout // 2
    train, test = np.flatnonzero(~held), np.flatnonzero(held)
    options = InstaOptions(**{k: parse_value(v) for k, v in overrides.items()})
    trainer, _ = build_trainer(options, FrameSet(frames.frames[train], frames.fps), MaskSet(masks.alpha[train]),
                               tracking.subset(train), device, 0, "torch" if device == "cpu" else "auto", steps)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    trainer.finalize()
    seconds = time.perf_counter() - started
    scene = Scene.build(FrameSet(frames.frames[test], frames.fps), MaskSet(masks.alpha[test]), tracking.subset(test),
                        trainer.geometry, device)
    values = []
    for i in range(len(test)):
        rgb, _ = trainer.render_frame(i, scene)
        values.append(psnr(float(((rgb - trainer.target(i, scene)) ** 2).mean())))
    return {"variant": overrides, "steps": steps, "it_per_s": steps / seconds, "heldout_psnr": float(np.mean(values)),
            "occupied": trainer.occupancy.fraction()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory (its image2video, segment and track steps done)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", action="append", default=[], help="OPTION=VALUE[,OPTION=VALUE...] (repeatable)")
    args = parser.parse_args()
    for variant in args.variant or [""]:
        overrides = dict(item.split("=", 1) for item in variant.split(",") if item)
        row = train_variant(args.run, args.steps, args.device, overrides)
        print(f"{variant or 'defaults'}: {row['it_per_s']:.2f} it/s, held-out PSNR {row['heldout_psnr']:.2f} dB, "
              f"occupied {row['occupied']:.3f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
