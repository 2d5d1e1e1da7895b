"""Measure the ``reference`` restorer on renders of a blurred avatar made from real portraits.

For each portrait (``../shared/data/portraits`` when present, and ``skimage.data.astronaut()``):

1. track it with the MediaPipe tracker (``ophav_mediapipe``; the script exits with a message without it);
2. make "renders of a blurred avatar": the portrait re-projected through its tracked mesh at a few small head
   turns (the face warped to the new pose, everything else left as it is), then blurred (Gaussian, sigma
   ``--sigma`` pixels at 512); the sharp re-projection is kept as the ground truth;
3. restore the blurred renders with ``reference`` and report, per render, in the face region: variance of the
   Laplacian and high-frequency energy before/after (and of the sharp ground truth), PSNR to the ground truth
   before/after, and the landmark-shape identity distance to the portrait before/after (each image tracked
   again; mean vertex distance between head-space shapes after a similarity alignment, in face widths);
4. write a before/after contact sheet per portrait and print images/s.

CSIM needs ArcFace weights, which are not on this machine and not part of this benchmark.

    .venv/bin/python benchmarks/bench_reference_restorer.py [--out benchmarks/out/reference_restorer]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORTRAITS = ROOT.parent / "shared" / "data" / "portraits"
SIZE = 512


@dataclass
class Row:
    portrait: str
    view: str
    lap: tuple[float, float, float]  # before, after, sharp ground truth
    hf: tuple[float, float, float]
    psnr: tuple[float, float]
    identity: tuple[float, float, float]  # before, after, ground truth; nan where tracking failed
    bands: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "reference_restorer")
    parser.add_argument("--portraits", type=Path, default=DEFAULT_PORTRAITS)
    parser.add_argument("--yaws", type=float, nargs="+", default=[-15.0, -7.0, 7.0, 15.0])
    parser.add_argument("--pitch", type=float, default=5.0, help="pitch of the odd-numbered views (degrees)")
    parser.add_argument("--sigma", type=float, default=2.0, help="blur of the renders, pixels at 512")
    parser.add_argument("--throughput", type=int, default=96, help="renders restored for the images/s figure")
    parser.add_argument("--cell", type=int, default=200, help="contact sheet cell height in pixels")
    parser.add_argument("--sheet-views", type=int, default=2, help="views shown on each contact sheet")
    parser.add_argument("--mesh-error", type=float, default=0.0,
                        help="simulated tracking error of the renders' meshes: a random smooth (affine) displacement "
                             "of this size in face widths, so the correspondence is not exact (0 = exact)")
    parser.add_argument("--no-refine", action="store_true", help="turn the optical-flow refinement off")
    return parser.parse_args()


def load_portraits(folder: Path) -> list[tuple[str, np.ndarray]]:
    from ophav_core.media import read_image

    out = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
                out.append((path.stem, read_image(path).image))
    else:
        print(f"note: {folder} not found; using only skimage's astronaut")
    import skimage.data

    out.append(("astronaut", np.ascontiguousarray(skimage.data.astronaut())))
    return out


def face_square(image: np.ndarray, tracking) -> np.ndarray:
    """The portrait as a SIZE x SIZE image framed like the coarse videos the pipeline renders: a square image
    is only resized; another is cropped to a square around the tracked face (about twice the face's extent,
    kept inside the image)."""
    import cv2

    height, width = image.shape[:2]
    if height != width:
        pts = tracking.project(tracking.vertices[0])
        centre = (pts.min(0) + pts.max(0)) / 2
        side = int(min(round(2 * max(np.ptp(pts, axis=0))), height, width))
        x0 = int(np.clip(round(centre[0] - side / 2), 0, width - side))
        y0 = int(np.clip(round(centre[1] - side / 2), 0, height - side))
        image = image[y0:y0 + side, x0:x0 + side]
    if image.shape[0] == SIZE:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA if image.shape[0] > SIZE else cv2.INTER_CUBIC)


def reproject(portrait: np.ndarray, tracking, yaw: float, pitch: float):
    """The portrait seen with the head turned by (yaw, pitch): mesh vertices of the new pose (camera space)
    and the image, warped through the mesh where the new view shows the face, the portrait elsewhere."""
    import cv2

    from ophav_core.stages.motion import euler_to_matrix
    from ophav_core.media.raster import rasterise

    turn = euler_to_matrix([yaw], [pitch], [0.0])[0].astype(np.float64)
    t = tracking.translation[0].astype(np.float64)
    cam = (tracking.vertices[0].astype(np.float64) - t) @ turn.T + t
    v2d = tracking.project(cam)
    raster = rasterise(v2d, cam[:, 2], tracking.faces, portrait.shape[:2])
    source = raster.interpolate(tracking.project(tracking.vertices[0].astype(np.float64)))
    map_x = np.arange(portrait.shape[1], dtype=np.float32)[None].repeat(portrait.shape[0], 0)
    map_y = np.arange(portrait.shape[0], dtype=np.float32)[:, None].repeat(portrait.shape[1], 1)
    map_x[raster.ys, raster.xs] = source[:, 0]
    map_y[raster.ys, raster.xs] = source[:, 1]
    image = cv2.remap(portrait, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return cam.astype(np.float32), image, raster.mask


def track_shape(tracker, image: np.ndarray) -> np.ndarray | None:
    """Head-space landmark shape (V, 3) of a single image, None when no face is found."""
    from ophav_core.errors import NoFaceFound
    from ophav_core.stages import FrameSet

    try:
        tr = tracker.track(FrameSet(image[None]), single_image=True)
    except NoFaceFound:
        return None
    return (tr.vertices[0] - tr.translation[0]) @ tr.rotation[0]  # R^T (X - t), row vectors


@dataclass
class Views:
    """Renders of one portrait's "avatar": names, sharp re-projections (ground truth), blurred renders, face
    masks (eroded mesh coverage, where metrics are taken) and camera-space meshes (N, V, 3)."""

    names: list[str]
    sharp: np.ndarray
    blurred: np.ndarray
    masks: np.ndarray
    cams: np.ndarray


def prepare(tracker, name: str, image: np.ndarray):
    """The portrait framed at SIZE and its tracking."""
    from ophav_core.stages import FrameSet

    first = tracker.track(FrameSet(image[None]), single_image=True, source=name)
    portrait = face_square(image, first)
    return portrait, tracker.track(FrameSet(portrait[None]), single_image=True, source=name)


def make_views(portrait: np.ndarray, tracking, turns: list[tuple[float, float]], sigma: float) -> Views:
    import cv2

    names, sharp, masks, cams = [], [], [], []
    for yaw, pitch in turns:
        cam, view, mask = reproject(portrait, tracking, yaw, pitch)
        names.append(f"yaw{yaw:+.0f} pitch{pitch:+.0f}")
        sharp.append(view)
        masks.append(cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool))
        cams.append(cam)
    blurred = [cv2.GaussianBlur(s, (0, 0), sigma * SIZE / 512) for s in sharp]
    return Views(names, np.stack(sharp), np.stack(blurred), np.stack(masks), np.stack(cams))


def restore_input(portrait: np.ndarray, tracking, name: str, images: np.ndarray, cams: np.ndarray,
                  vertices2d: np.ndarray | None = None):
    from ophav_core.stages import Portrait, RestoreInput

    return RestoreInput(
        images=images, alpha=np.ones(images.shape[:3], np.float32), landmarks5=tracking.landmarks5(cams),
        vertices2d=tracking.project(cams) if vertices2d is None else vertices2d, vertex_depth=cams[..., 2],
        portrait=Portrait(portrait, name), portrait_vertices2d=tracking.project(tracking.vertices[0]),
        portrait_vertex_depth=tracking.vertices[0, :, 2], faces=tracking.faces)


def measure(name: str, image: np.ndarray, args, tracker, restorer, out_dir: Path) -> tuple[list[Row], float]:
    from ophav_core.media import contact_sheet, save_png
    from ophav_reference.metrics import high_frequency_energy, laplacian_variance, shape_distance

    portrait, tracking = prepare(tracker, name, image)
    portrait_shape = track_shape(tracker, portrait)
    turns = [(yaw, args.pitch if k % 2 else 0.0) for k, yaw in enumerate(args.yaws)]
    views = make_views(portrait, tracking, turns, args.sigma)
    v2d = tracking.project(views.cams)
    if args.mesh_error > 0:
        v2d = _mesh_error(v2d, args.mesh_error, np.random.default_rng(len(name)))
    start = time.perf_counter()
    results = restorer.restore_detailed(restore_input(portrait, tracking, name, views.blurred, views.cams, v2d))
    per_second = len(results) / (time.perf_counter() - start)

    def identity(im: np.ndarray) -> float:
        shape = track_shape(tracker, im)
        return float("nan") if shape is None or portrait_shape is None else shape_distance(shape, portrait_shape)

    rows, tiles, labels = [], [], []
    shown = _sheet_views(len(results), args.sheet_views)
    for i, result in enumerate(results):
        before, after, truth, mask = views.blurred[i], result.image, views.sharp[i], views.masks[i]
        rows.append(Row(name, views.names[i], tuple(laplacian_variance(x, mask) for x in (before, after, truth)),
                        tuple(high_frequency_energy(x, mask) for x in (before, after, truth)),
                        (_psnr(before, truth, mask), _psnr(after, truth, mask)),
                        tuple(identity(x) for x in (before, after, truth)), result.bands))
        if i in shown:
            tiles += [before, after] + [_zoom(x, tracking, views.cams[i]) for x in (before, after, truth)]
            labels += [f"before {views.names[i]}", "after (reference)", "before, eyes zoomed", "after, eyes zoomed",
                       "sharp truth, eyes zoomed"]
    blank = np.full_like(portrait, 255)
    sheet = contact_sheet([portrait] + [blank] * 4 + tiles, columns=5,
                          labels=["portrait (the reference)", "", "", "", ""] + labels, cell=args.cell)
    save_png(out_dir / f"{name}.png", sheet)
    return rows, per_second


def _psnr(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    mse = ((image[mask].astype(np.float64) - truth[mask]) ** 2).mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))


def _mesh_error(v2d: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
    """Each view's 2D mesh moved by a random affine displacement (shift plus a little rotation/scale/shear)
    whose typical magnitude is ``size`` face widths: what a slightly wrong pose looks like."""
    out = v2d.astype(np.float64).copy()
    for i, pts in enumerate(out):
        width = float(np.ptp(pts[:, 0]))
        centre = pts.mean(axis=0)
        shift = rng.normal(size=2) * size * width
        linear = rng.normal(size=(2, 2)) * size
        out[i] = pts + shift + (pts - centre) @ linear.T
    return out.astype(np.float32)


def _sheet_views(count: int, wanted: int) -> set[int]:
    return set(np.unique(np.linspace(0, count - 1, max(1, min(wanted, count))).round().astype(int)).tolist())


def _zoom(image: np.ndarray, tracking, cam: np.ndarray) -> np.ndarray:
    """A square around the eyes and the top of the nose, enlarged to the image's size with nearest-neighbour
    sampling (every pixel shows as it is; detail is easiest to judge there)."""
    import cv2

    lm = tracking.landmarks5(cam[None])[0]
    centre = lm[:2].mean(0) + np.array([0.0, 0.15]) * np.linalg.norm(lm[0] - lm[1])
    half = int(max(16, 0.8 * np.linalg.norm(lm[0] - lm[1])))
    x0 = int(np.clip(centre[0] - half, 0, image.shape[1] - 2 * half))
    y0 = int(np.clip(centre[1] - half, 0, image.shape[0] - 2 * half))
    crop = image[y0:y0 + 2 * half, x0:x0 + 2 * half]
    return cv2.resize(crop, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)


def throughput(restorer, name: str, image: np.ndarray, tracker, count: int) -> str:
    """Images per second restoring ``count`` 512x512 renders in one batch (8 views repeated), as a line."""
    portrait, tracking = prepare(tracker, name, image)
    views = make_views(portrait, tracking, [(float(yaw), 0.0) for yaw in np.linspace(-15, 15, 8)], 2.0)
    idx = np.arange(count) % len(views.names)
    restorer.restore(restore_input(portrait, tracking, name, views.blurred[:2], views.cams[:2]))  # warm-up
    batch = restore_input(portrait, tracking, name, views.blurred[idx], views.cams[idx])
    load = os.getloadavg()[0]  # other processes on the machine share its cores
    start, cpu = time.perf_counter(), time.process_time()
    restorer.restore(batch)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    workers = restorer.options.workers or "auto"
    return (f"throughput: {count} renders {SIZE}x{SIZE} ({name}, face filling the frame): {count / wall:.1f} "
            f"images/s wall, {count / cpu:.1f} images per CPU-second; {os.cpu_count()} cores, {workers} workers, "
            f"load average {load:.1f} before the run")


def table(rows: list[Row]) -> list[str]:
    head = (f"{'portrait':22s} {'view':15s} {'lapvar before':>13s} {'after':>7s} {'truth':>7s}  {'HF before':>9s} "
            f"{'after':>7s} {'truth':>7s}  {'PSNR before':>11s} {'after':>6s}  {'id before':>9s} {'after':>7s} "
            f"{'truth':>7s}  band shares")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.portrait:22s} {r.view:15s} {r.lap[0]:13.1f} {r.lap[1]:7.1f} {r.lap[2]:7.1f}  {r.hf[0]:9.2f} "
                     f"{r.hf[1]:7.2f} {r.hf[2]:7.2f}  {r.psnr[0]:11.2f} {r.psnr[1]:6.2f}  {r.identity[0]:9.4f} "
                     f"{r.identity[1]:7.4f} {r.identity[2]:7.4f}  " + " ".join(f"{b:.2f}" for b in r.bands))
    lap = np.array([r.lap for r in rows])
    hf = np.array([r.hf for r in rows])
    psnr = np.array([r.psnr for r in rows])
    ident = np.array([r.identity for r in rows])
    lines.append("-" * len(head))
    lines.append(
        f"mean over {len(rows)} renders: lapvar {lap[:, 0].mean():.1f} -> {lap[:, 1].mean():.1f} "
        f"(truth {lap[:, 2].mean():.1f}); HF {hf[:, 0].mean():.2f} -> {hf[:, 1].mean():.2f} "
        f"(truth {hf[:, 2].mean():.2f}); PSNR {psnr[:, 0].mean():.2f} -> {psnr[:, 1].mean():.2f} dB; "
        f"identity distance {np.nanmean(ident[:, 0]):.4f} -> {np.nanmean(ident[:, 1]):.4f} "
        f"(truth {np.nanmean(ident[:, 2]):.4f}); sharper in {int((lap[:, 1] > lap[:, 0]).sum())}/{len(rows)}, "
        f"identity no worse (within 0.002) in {int((ident[:, 1] <= ident[:, 0] + 0.002).sum())}/{len(rows)}")
    return lines


def main() -> int:
    args = parse_args()
    try:
        from ophav_mediapipe.tracker import MediapipeTracker
    except ImportError as exc:
        print(f"this benchmark needs the MediaPipe tracker (ophav_mediapipe.tracker): {exc}", file=sys.stderr)
        return 2
    import warnings

    from ophav_core.testing.contracts import tiny_context
    from ophav_reference.restorer import ReferenceRestorer

    warnings.filterwarnings("ignore", message=".*more than one face.*")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"renders: yaws {args.yaws}, blur sigma {args.sigma} px at {SIZE}, mesh error {args.mesh_error} face widths, "
          f"refine {'off' if args.no_refine else 'on'}")
    context = tiny_context()
    tracker = MediapipeTracker(context=context)
    restorer = ReferenceRestorer({"refine": not args.no_refine}, context=context)
    rows: list[Row] = []
    portraits = load_portraits(args.portraits)
    for name, image in portraits:
        found, per_second = measure(name, image, args, tracker, restorer, args.out)
        rows += found
        sheet = args.out / f"{name}.png"
        print(f"{name}: {len(found)} renders, {per_second:.1f} images/s (restore only), sheet {sheet}")
    lines = table(rows)
    lines.append(throughput(restorer, *portraits[0], tracker, args.throughput))
    print("\n" + "\n".join(lines))
    (args.out / "results.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
