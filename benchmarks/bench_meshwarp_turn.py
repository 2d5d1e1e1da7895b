"""The coarse video where it turns furthest: meshwarp frames at wide yaw, scored by models meshwarp never used.

    python benchmarks/bench_meshwarp_turn.py [--size 256] [--portraits a.png ...] [--out FILE.json] [--sheet FILE]

For skimage's astronaut and every portrait in ../shared/data/portraits, meshwarp draws the neutral face turned to
each yaw of ``YAWS``; per portrait and yaw: whether dlib's HOG detector finds one face (frames upscaled as
plugins/ophav_metrics does), the dlib descriptor distance to the portrait (identity; under 0.6 usually means
the same person), and the share of the face (the drawn mesh's pixels) that is near black (every channel < 45):
what a fill that fails leaves there. Run it at two commits to compare them (a git worktree of the older one).
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
YAWS = (-52.0, -45.0, -30.0, 0.0, 30.0, 45.0, 52.0)


def portraits(named: list[str]) -> list[tuple[str, np.ndarray]]:
    from ophav_core.media import read_image

    if named:
        return [(Path(p).stem, read_image(p).image) for p in named]
    out = []
    try:
        from skimage import data

        out.append(("astronaut", data.astronaut()))
    except ImportError:
        pass
    for path in sorted((SHARED / "portraits").glob("*.*")):
        out.append((path.stem, read_image(path).image))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--portraits", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sheet", type=Path, default=None, help="a JPEG of every frame (portraits x yaws)")
    args = parser.parse_args(argv)

    from ophav_core.media.raster import rasterise
    from ophav_core.stages import Portrait
    from ophav_core.stages.motion import euler_to_matrix
    from ophav_core.testing import contracts
    from ophav_meshwarp.generator import MeshWarp
    from ophav_meshwarp.warper import render_frame
    from ophav_metrics import faces

    rows, sheet = [], []
    for name, image in portraits(args.portraits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warp = MeshWarp({"resolution": args.size}, contracts.tiny_context())
            source, _ = warp.prepare(Portrait(image, name))
        frames, dark = [], []
        for yaw in YAWS:
            frame, info = render_frame(source, euler_to_matrix(np.array([yaw]), np.zeros(1), np.zeros(1))[0])
            ids = rasterise(info.points2d.astype(np.float64), info.vertices[:, 2].astype(np.float64),
                            source.parts.faces, (args.size, args.size)).ids
            dark.append(float((frame[ids >= 0].max(axis=-1) < 45).mean()))
            frames.append(frame)
        frames = np.stack(frames)
        detected = faces.detected_once(frames)
        identity = faces.identity_distance(frames, image)
        for i, yaw in enumerate(YAWS):
            rows.append({"portrait": name, "yaw": yaw, "detected": float(detected[i]),
                         "identity": float(identity[i]), "dark_face_share": round(dark[i], 4)})
        print(name, " ".join(f"{y:+.0f}:{'D' if d else '-'}/{s:.2f}/{k:.3f}"
                             for y, d, s, k in zip(YAWS, detected, identity, dark)), flush=True)
        sheet.append(np.concatenate(list(frames), axis=1))
    wide = [r for r in rows if abs(r["yaw"]) >= 45]
    summary = {"size": args.size, "yaws": YAWS,
               "detect_rate_45_52": float(np.mean([r["detected"] for r in wide])),
               "identity_45_52_mean": float(np.nanmean([r["identity"] for r in wide])),
               "identity_45_52_max": float(np.nanmax([r["identity"] for r in wide])),
               "dark_face_share_45_52_max": float(max(r["dark_face_share"] for r in wide))}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if args.sheet and sheet:
        import cv2

        cv2.imwrite(str(args.sheet), np.concatenate(sheet, axis=0)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])


if __name__ == "__main__":
    main()
