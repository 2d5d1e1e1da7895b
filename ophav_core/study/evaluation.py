"""The evaluation protocols behind ``ophav eval`` (the layout of the paper's Table 1), the collection of
metrics, the tables and the plots. The metrics themselves are plugins (``register_metric``, see
:mod:`ophav_core.study.metrics`); ours are in ``plugins/ophav_metrics``. No network is defined here.

Protocols (each builds the :class:`~ophav_core.study.metrics.MetricInputs` its metrics may ask for):

* :func:`self_reenactment`: the avatar is rendered at the tracked parameters of held-out frames (every Nth
  frame of a dataset, the frames ``ophav fit --holdout N`` leaves out, or of a run's coarse video) and compared
  with those frames.
* :func:`cross_reenactment`: the avatar is driven by another person's video; expression, pose and keypoints are
  compared with the driver, identity and colour with the portrait, FID against the driver's (matted) frames.
* :func:`novel_views`: the avatar turned through a yaw (and pitch) grid with its neutral expression; per angle
  identity against the portrait, detection, colour drift, sharpness and floaters (``ophav eval --views``).
* :func:`score_images`: the same metrics on images someone else rendered (benchmarks).

This module imports nothing heavy at import time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ophav_core import __version__
from ophav_core.errors import UsageError
from ophav_core.stages.data import FrameSet, MaskSet, Portrait, RenderRequest, RenderResult, Tracking
from ophav_core.study.metrics import Column, MetricInputs, MetricSpec, collect, resolve_metrics

#: The paper's Table 1 columns, in its order (the shipped metric plugin registers them first).
PAPER_METRICS = ("psnr", "ssim", "lpips", "fid", "csim", "aed", "apd", "akd")
#: What the novel-view protocol measures by default.
VIEW_METRICS = ("identity", "detect_rate", "colour_drift", "sharpness", "floaters")
TURNTABLE_YAWS = tuple(float(y) for y in range(-60, 61, 15))
GRID_PITCHES = (-25.0, -12.5, 0.0, 12.5, 25.0)

PROTOCOL_TITLES = {"self": "Self-reenactment", "cross": "Cross-identity reenactment", "views": "Novel views",
                   "images": "Given images"}


# ---------------------------------------------------------------------------------------------- metrics


def available_metrics(available: Mapping[str, MetricSpec] | None = None) -> dict[str, MetricSpec]:
    """Every registered metric (the plugin host's), or ``available`` when given."""
    if available is not None:
        return dict(available)
    from ophav_core.plugins import get_host

    return dict(get_host().metrics)


def parse_metrics(text: str | Sequence[str] | None, available: Mapping[str, MetricSpec] | None = None
                  ) -> tuple[str, ...]:
    """Metric names from ``--metrics`` (comma-separated) or a list, checked against the registered ones, in table
    order; None = all."""
    return tuple(s.name for s in resolve_metrics(text, available_metrics(available)))


def _specs(metrics: str | Sequence[str] | None, available: Mapping[str, MetricSpec] | None) -> list[MetricSpec]:
    return resolve_metrics(metrics, available_metrics(available))


def column_info(available: Mapping[str, MetricSpec] | None = None) -> dict[str, Column]:
    """Every column of the registered metrics, in table order."""
    out: dict[str, Column] = {}
    for spec in resolve_metrics(None, available_metrics(available)):
        for column in spec.columns():
            out[column.name] = column
    return out


# ---------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """One avatar under one protocol: mean per column, the reasons for missing ones, and what was compared.

    pred / target: the compared images (uint8, composited on black); target is None without ground truth.
    region: bool (N, H, W) the head region PSNR/SSIM use (None without ground truth). columns: what each
    reported number is (header, direction, definition)."""

    protocol: str
    label: str
    metrics: dict[str, float | None]
    missing: dict[str, str]
    per_frame: dict[str, list[float | None]]
    settings: dict[str, Any]
    pred: np.ndarray
    target: np.ndarray | None = None
    region: np.ndarray | None = None
    columns: dict[str, Column] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ophav": __version__, "protocol": self.protocol, "label": self.label,
                "metrics": dict(self.metrics), "missing": self.missing,
                "definitions": {k: c.definition for k, c in self.columns.items()},
                "columns": {k: c.to_json() for k, c in self.columns.items()},
                "settings": self.settings, "per_frame": self.per_frame}

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per render: its index (and yaw/pitch for novel views) and each column's value (None: not
        measurable in that render)."""
        out = []
        for i in range(len(self.pred)):
            row: dict[str, Any] = {"frame": i}
            for key in ("yaw", "pitch"):
                if key in self.settings:
                    row[key] = self.settings[key][i]
            for name in self.columns:
                values = self.per_frame.get(name)
                row[name] = values[i] if values is not None else None
            out.append(row)
        return out


def _column(name: str, info: Mapping[str, Any] | None) -> Column:
    if isinstance(info, Column):
        return info
    if info:
        return Column(name, info.get("header", name), bool(info.get("higher_is_better", True)),
                      int(info.get("decimals", 4)), info.get("definition", ""))
    known = column_info()
    return known.get(name, Column(name, name, True))


def _row_columns(rows: Sequence[Mapping[str, Any]]) -> list[Column]:
    """The columns the rows carry, in the order of their first appearance."""
    seen: dict[str, Column] = {}
    for row in rows:
        infos = row.get("columns") or {}
        for name in row.get("metrics", {}):
            if name not in seen:
                seen[name] = _column(name, infos.get(name))
    return list(seen.values())


def format_value(column: Column, value: Any) -> str:
    return column.format(value)


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Rows (``EvalResult.to_json()`` dicts) as the paper's Table 1: one row per method or avatar, one column
    per computed number (the paper's PSNR↑ SSIM↑ LPIPS↓ FID↓ CSIM↑ AED↓ APD↓ AKD↓ first); a missing value reads
    n/a with its reason below."""
    protocols = sorted({row["protocol"] for row in rows})
    lines = [f"**{title or ' / '.join(PROTOCOL_TITLES.get(p, p) for p in protocols)}**", ""]
    with_protocol = len(protocols) > 1
    columns = _row_columns(rows)
    header = ["Method"] + (["Protocol"] if with_protocol else []) + [c.header for c in columns]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + (["---"] if with_protocol else [])
                                                              + ["---:"] * len(columns)) + "|"]
    reasons: dict[str, str] = {}
    for row in rows:
        cells = [row["label"]] + ([PROTOCOL_TITLES.get(row["protocol"], row["protocol"])] if with_protocol else [])
        cells += [c.format(row["metrics"].get(c.name)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
        for metric, reason in row.get("missing", {}).items():
            reasons.setdefault(metric, reason)
    if reasons:
        headers = {c.name: c.header for c in columns}
        lines += ["", "n/a:"] + [f"- {headers.get(m, m)}: {_one_line(r)}" for m, r in reasons.items()]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- images


def uncomposite(render: RenderResult) -> np.ndarray:
    """The renders over black: fields composite the head over a constant background of their choice; it is
    estimated per image from the pixels the head does not cover (alpha < 0.01) and taken out, so renders and
    matted frames are compared on the same (black) background."""
    rgb = render.rgb.astype(np.float32)
    alpha = render.alpha[..., None]
    out = np.empty_like(rgb)
    for i in range(len(rgb)):
        empty = render.alpha[i] < 0.01
        background = np.median(rgb[i][empty], axis=0) if empty.any() else np.zeros(3, np.float32)
        out[i] = rgb[i] - background * (1.0 - alpha[i])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def matte(frames: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Frames composited on black with their head alpha."""
    return np.clip(np.rint(frames.astype(np.float32) * alpha[..., None]), 0, 255).astype(np.uint8)


def head_region(target_alpha: np.ndarray, render_alpha: np.ndarray) -> np.ndarray:
    """Where either side shows the head: a render missing part of the head, or adding one, is penalised."""
    return (target_alpha > 0.5) | (render_alpha > 0.5)


#: How far the tracked head region reaches beyond the mesh's hull: up (hair) and down (neck) in face heights,
#: sideways (ears, hair) in face widths; a little beyond the default segmenter's matte (0.8 up, 0.6 sideways).
HAIR_UP, NECK_DOWN, SIDEWAYS = 1.0, 0.2, 0.7


def region_around(points: np.ndarray, size: tuple[int, int], up: float = HAIR_UP, down: float = NECK_DOWN,
                  sideways: float = SIDEWAYS) -> np.ndarray:
    """bool (H, W): the convex hull of ``points`` (V, 2, pixels) grown ``up`` face heights above, ``down`` below
    and ``sideways`` face widths beside it: the Minkowski sum of the hull with a half-ellipse above and one
    below, a convex region filled at once."""
    import cv2

    points = np.asarray(points, np.float64)
    points = points[np.isfinite(points).all(axis=1)]
    mask = np.zeros(size, np.uint8)
    if len(points) < 3:
        return mask.astype(bool)
    width, height = np.ptp(points[:, 0]), np.ptp(points[:, 1])
    angle = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    dy = np.where(np.sin(angle) < 0, up, down) * height * np.sin(angle)  # image y grows downwards
    band = np.stack([sideways * width * np.cos(angle), dy], axis=1)
    grown = (points[:, None, :] + band[None]).reshape(-1, 2)
    hull = cv2.convexHull(np.round(np.concatenate([points, grown]) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def tracked_head_region(tracking: Tracking, **band: float) -> np.ndarray:
    """bool (N, H, W): per frame, the tracked mesh's projected hull grown by the hair/neck band
    (:func:`region_around`), at the tracking's image size."""
    width, height = (int(s) for s in tracking.image_size)
    points = tracking.project(tracking.vertices.astype(np.float64))
    return np.stack([region_around(p, (height, width), **band) for p in points])


# ---------------------------------------------------------------------------------------------- protocols


def neutral_request(template: Tracking, resolution: tuple[int, int] | None = None) -> RenderRequest:
    """The avatar's neutral frontal view: its most frontal template frame, turned to face the camera."""
    from ophav_core.pipeline.animate import requests_from_motion
    from ophav_core.stages.motion import Motion

    zero = np.zeros(1, np.float32)
    return requests_from_motion(template, Motion(1.0, zero, zero, zero, {}), None, resolution=resolution)


def view_request(template: Tracking, yaws: Sequence[float], pitches: Sequence[float],
                 resolution: tuple[int, int] | None = None) -> tuple[RenderRequest, np.ndarray, np.ndarray]:
    """Render requests for every (pitch, yaw) of the grid (yaw fastest), relative to the avatar's frontal view
    (as ``ophav render --views turntable``), neutral expression; and the yaw and pitch of each."""
    from ophav_core.pipeline.animate import requests_from_motion
    from ophav_core.stages.motion import Motion

    pitch, yaw = (a.reshape(-1).astype(np.float32) for a in np.meshgrid(np.asarray(pitches, np.float32),
                                                                       np.asarray(yaws, np.float32), indexing="ij"))
    motion = Motion(1.0, yaw, pitch, np.zeros_like(yaw), {})
    return requests_from_motion(template, motion, None, resolution=resolution), yaw, pitch


def _common_lazy(field_component, avatar, template: Tracking, request: RenderRequest, render_tracking: Tracking,
                 tracker, portrait: Portrait | None) -> dict[str, Any]:
    """What every protocol can give lazily: the neutral frontal render, the tracked head region, and the
    portrait's face for CSIM."""
    resolution = tuple(int(s) for s in request.resolution)
    lazy: dict[str, Any] = {
        "neutral": lambda: uncomposite(field_component.render(avatar, neutral_request(template, resolution))),
        "head_region": lambda: tracked_head_region(render_tracking),
    }
    if portrait is not None and tracker is not None:
        lazy["identity_reference"] = lambda: _portrait_face(tracker, portrait, template)
    return lazy


def _portrait_face(tracker, portrait: Portrait, template: Tracking) -> tuple[np.ndarray, np.ndarray]:
    tracked = tracker.track(FrameSet(portrait.image[None], fps=1.0), single_image=True, reference=template,
                            source=portrait.source or "the portrait")
    return portrait.image[None], tracked.landmarks5()


def same_basis(a: Tracking, b: Tracking) -> bool:
    """Whether two trackings share the canonical mesh and expression basis (one was made from the other)."""
    return (a.canonical_vertices.shape == b.canonical_vertices.shape
            and a.expression_basis.shape == b.expression_basis.shape
            and np.allclose(a.canonical_vertices, b.canonical_vertices, atol=1e-5)
            and np.allclose(a.expression_basis, b.expression_basis, atol=1e-5))


def _subset_frames(frames: FrameSet, index: np.ndarray, fps: float) -> FrameSet:
    return FrameSet(frames.frames[index], fps=fps, driving={k: v[index] for k, v in frames.driving.items()})


def _result(protocol: str, label: str, specs: Sequence[MetricSpec], inputs: MetricInputs, settings: dict[str, Any],
            target: np.ndarray | None = None, region: np.ndarray | None = None) -> EvalResult:
    collected = collect(specs, inputs)
    settings = {**settings, "metric_plugins": {s.name: f"{s.package} {s.version}" for s in specs}}
    return EvalResult(protocol, label, collected.metrics, collected.missing, collected.per_frame, settings,
                      inputs.pred, target, region, collected.columns)


def self_reenactment(field_component, tracker, avatar, frames: FrameSet, masks: MaskSet,
                     tracking: Tracking | None = None, *, every: int = 10, portrait: Portrait | None = None,
                     metrics: str | Sequence[str] | None = None, device: str = "cpu", label: str = "",
                     max_frames: int | None = None, available: Mapping[str, MetricSpec] | None = None) -> EvalResult:
    """Render the avatar at the tracked parameters of every ``every``-th frame and compare with the frames.

    tracking: the frames' tracking; used as it is when it shares the avatar's canonical mesh and basis (the
        avatar was trained on it), else the frames are tracked again into the avatar's basis.
    portrait: the person's photo: identity (and CSIM) compare each render with it; without it CSIM compares
        with the frame and identity is n/a.
    metrics: names (None: every registered metric); available: the metric specs to choose from (default: the
        plugin host's)."""
    from ophav_core.pipeline.animate import tracking_for_request

    masks.check_matches(frames)
    if every < 1:
        raise UsageError("--every must be at least 1")
    specs = _specs(metrics, available)
    index = np.arange(0, len(frames), every)
    if max_frames:
        index = index[:max_frames]
    template = avatar.template
    fps = frames.fps / every
    held_out = _subset_frames(frames, index, fps)
    if tracking is not None and len(tracking) == len(frames) and same_basis(tracking, template):
        eval_tracking, source_tracking = tracking.subset(index), "the dataset's own"
    else:
        eval_tracking = tracker.track(held_out, reference=template, source="the held-out frames")
        source_tracking = "tracked again into the avatar's basis"
    eval_tracking.check_matches(held_out)
    request = RenderRequest.from_tracking(eval_tracking)
    rendered = field_component.render(avatar, request)
    pred = uncomposite(rendered)
    target = matte(held_out.frames, masks.alpha[index])
    region = head_region(masks.alpha[index], rendered.alpha)
    render_tracking = tracking_for_request(template, request)

    lazy = _common_lazy(field_component, avatar, template, request, render_tracking, tracker, portrait)
    lazy["reference_tracking"] = lambda: tracker.track(held_out, reference=template, source="the held-out frames")
    if portrait is None:
        lazy["identity_reference"] = lambda: (target, eval_tracking.landmarks5())
    inputs = MetricInputs("self", pred, given={
        "alpha": rendered.alpha, "target": target, "region": region, "frames": held_out.frames,
        "real_heads": target, "portrait": portrait.image if portrait is not None else None,
        "render_tracking": render_tracking, "template": template, "tracker": tracker, "fps": fps, "device": device,
    }, lazy=lazy, unavailable={"portrait": "no portrait to compare the identity with (give --portrait, or evaluate "
                                           "a run, whose portrait is known)"})
    settings = {"frames": int(len(index)), "every": every, "frame_index": index.tolist(),
                "resolution": [int(s) for s in request.resolution], "tracking": source_tracking,
                "identity_reference": "portrait" if portrait is not None else "frames",
                "held_out": f"frames i % {every} == 0 (the frames `ophav fit --holdout {every}` leaves out)",
                "device": device}
    return _result("self", label, specs, inputs, settings, target, region)


def cross_reenactment(field_component, tracker, avatar, driver: FrameSet, portrait: Portrait | None = None, *,
                      segmenter=None, metrics: str | Sequence[str] | None = None, device: str = "cpu",
                      label: str = "", resolution: tuple[int, int] | None = None,
                      driver_tracking: Tracking | None = None,
                      available: Mapping[str, MetricSpec] | None = None) -> EvalResult:
    """Drive the avatar with another person's video (relative motion from the driver's first frame, as
    ``ophav render --driver``); expression, pose and keypoints against the driver, identity and colour against
    the portrait (and the avatar's neutral render), FID against the driver's frames matted by ``segmenter``."""
    from ophav_core.pipeline.animate import requests_from_driver, tracking_for_request

    specs = _specs(metrics, available)
    template = avatar.template
    if driver_tracking is None:
        driver_tracking = tracker.track(driver, reference=template, source="the driving video")
    driver_tracking.check_matches(driver)
    request = requests_from_driver(template, driver_tracking, resolution=resolution)
    rendered = field_component.render(avatar, request)
    pred = uncomposite(rendered)
    render_tracking = tracking_for_request(template, request)

    lazy = _common_lazy(field_component, avatar, template, request, render_tracking, tracker, portrait)
    unavailable = {"target": "cross-identity reenactment has no ground-truth image",
                   "region": "cross-identity reenactment has no ground-truth image",
                   "portrait": "no portrait to compare the identity with (give --portrait)",
                   "identity_reference": "no portrait to compare the identity with (give --portrait)",
                   "real_heads": "FID needs a segmenter to cut the driver's head out of its frames"}
    if segmenter is not None:
        lazy["real_heads"] = lambda: matte(driver.frames, segmenter.segment(driver, driver_tracking).alpha)
    inputs = MetricInputs("cross", pred, given={
        "alpha": rendered.alpha, "frames": driver.frames, "portrait": portrait.image if portrait is not None else None,
        "render_tracking": render_tracking, "template": template, "tracker": tracker,
        "reference_tracking": driver_tracking, "fps": driver.fps, "device": device,
    }, lazy=lazy, unavailable=unavailable)
    settings = {"frames": len(driver), "resolution": [int(s) for s in request.resolution],
                "driving": "relative to the driver's first frame, applied to the avatar's most frontal frame",
                "apd_note": "absolute poses are compared; a driver whose first frame is not frontal adds a constant "
                            "offset", "device": device}
    return _result("cross", label, specs, inputs, settings)


def novel_views(field_component, avatar, portrait: Portrait | np.ndarray | None = None, *,
                yaws: Sequence[float] = TURNTABLE_YAWS, pitches: Sequence[float] = (0.0,), size: int | None = None,
                metrics: str | Sequence[str] | None = VIEW_METRICS, tracker=None, device: str = "cpu",
                label: str = "", available: Mapping[str, MetricSpec] | None = None) -> EvalResult:
    """The avatar turned through every (pitch, yaw) in degrees (yaw fastest; relative to its frontal view,
    neutral expression) at ``size`` pixels (default: the avatar's own), each render measured against the
    ``portrait`` (a Portrait or a uint8 (H, W, 3) image) and the avatar's neutral frontal render.

    Returns an EvalResult: ``.metrics`` the means over the views, ``.rows`` one dict per view (yaw, pitch and
    each column), ``.settings['yaw'/'pitch']`` the angles. ``tracker`` is only needed for CSIM."""
    from ophav_core.pipeline.animate import tracking_for_request

    if isinstance(portrait, np.ndarray):
        portrait = Portrait(portrait)
    if not len(yaws) or not len(pitches):
        raise UsageError("novel views: give at least one yaw and one pitch")
    specs = _specs(metrics, available)
    template = avatar.template
    request, yaw, pitch = view_request(template, yaws, pitches, (size, size) if size else None)
    rendered = field_component.render(avatar, request)
    pred = uncomposite(rendered)
    render_tracking = tracking_for_request(template, request)
    lazy = _common_lazy(field_component, avatar, template, request, render_tracking, tracker, portrait)
    no_truth = "novel views have no ground-truth frames"
    inputs = MetricInputs("views", pred, given={
        "alpha": rendered.alpha, "portrait": portrait.image if portrait is not None else None,
        "render_tracking": render_tracking, "template": template, "tracker": tracker, "fps": 1.0, "device": device,
    }, lazy=lazy, unavailable={"target": no_truth, "region": no_truth, "frames": no_truth, "real_heads": no_truth,
                               "reference_tracking": no_truth,
                               "portrait": "no portrait to compare the identity with (give --portrait)",
                               "identity_reference": "CSIM needs the portrait and a tracker"})
    settings = {"views": len(yaw), "yaw": [float(v) for v in yaw], "pitch": [float(v) for v in pitch],
                "resolution": [int(s) for s in request.resolution],
                "pose": "relative to the avatar's most frontal template frame, its expression kept", "device": device}
    return _result("views", label, specs, inputs, settings)


def score_images(images: np.ndarray, portrait: Portrait | np.ndarray | None = None, *,
                 alpha: np.ndarray | None = None, tracking: Tracking | None = None,
                 head_region: np.ndarray | None = None, neutral: np.ndarray | None = None,
                 target: np.ndarray | None = None, metrics: str | Sequence[str] | None = VIEW_METRICS,
                 label: str = "", available: Mapping[str, MetricSpec] | None = None) -> EvalResult:
    """The metrics on renders made elsewhere (a benchmark's): ``images`` uint8 (N, H, W, 3) composited on black,
    against the ``portrait``; ``alpha`` (N, H, W) and the tracked ``head_region`` (bool (N, H, W), or the
    ``tracking`` of the renders to derive it) for floaters; ``neutral`` (the avatar's neutral frontal render,
    (H, W, 3) or (1, H, W, 3)) for colour drift; ``target`` ground truth for sharpness and the paper's
    image metrics. What is not given makes the metrics that need it n/a. ``.rows`` has one dict per image."""
    images = np.asarray(images)
    if isinstance(portrait, Portrait):
        portrait = portrait.image
    specs = _specs(metrics, available)
    if head_region is None and tracking is not None:
        head_region = tracked_head_region(tracking)
    if neutral is not None and np.asarray(neutral).ndim == 3:
        neutral = np.asarray(neutral)[None]
    given = {"alpha": alpha, "portrait": portrait, "head_region": head_region, "neutral": neutral,
             "target": target, "frames": target, "render_tracking": tracking}
    inputs = MetricInputs("images", images, given=given, unavailable={
        "portrait": "no portrait given", "neutral": "no neutral render given", "alpha": "no alpha given",
        "head_region": "no head region (or tracking of the renders) given", "target": "no ground truth given"})
    return _result("images", label, specs, inputs, {"images": int(len(images))})


# ---------------------------------------------------------------------------------------------- sources


def load_reference(folder: Path) -> tuple[FrameSet, MaskSet, Tracking, dict[str, Any]]:
    """Frames, masks and tracking of a dataset (``ophav preprocess``), of a run directory (its coarse video) or of a
    folder in INSTA's format (its held-out frames: those of val and test that train lacks)."""
    import json

    from ophav_core.media import insta_format

    folder = Path(folder)
    if insta_format.is_insta_dataset(folder):
        dataset = insta_format.read_insta(folder, split="held_out")
        return dataset.frames, dataset.masks, dataset.tracking, dataset.meta
    if (folder / "dataset.json").is_file():
        meta = json.loads((folder / "dataset.json").read_text())
        names, kind = ("frames.npz", "masks.npz", "tracking.npz"), "dataset"
    elif (folder / "manifest.json").is_file():
        meta = json.loads((folder / "manifest.json").read_text())
        names, kind = ("image2video/frames.npz", "segment/masks.npz", "track/tracking.npz"), "run"
    else:
        raise UsageError(f"{folder} is neither a dataset (`ophav preprocess`) nor a run directory (`ophav run`)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"{folder} lacks {', '.join(missing)} (an unfinished run or dataset?)")
    frames, masks, tracking = (FrameSet.load(folder / names[0]), MaskSet.load(folder / names[1]),
                               Tracking.load(folder / names[2]))
    masks.check_matches(frames)
    tracking.check_matches(frames)
    return frames, masks, tracking, {"kind": kind, **meta}


def views_table(result: EvalResult) -> str:
    """The novel-view result as one row per angle: yaw, pitch and each column."""
    columns = list(result.columns.values())
    lines = [f"**Novel views: {result.label}**" if result.label else "**Novel views**", "",
             "| yaw | pitch | " + " | ".join(c.header for c in columns) + " |",
             "|---:|---:|" + "---:|" * len(columns)]
    for row in result.rows:
        lines.append(f"| {row['yaw']:+.0f} | {row['pitch']:+.1f} | "
                     + " | ".join(c.format(row.get(c.name)) for c in columns) + " |")
    lines.append("| mean | | " + " | ".join(c.format(result.metrics.get(c.name)) for c in columns) + " |")
    reasons = {c.header: result.missing[c.name] for c in columns if c.name in result.missing}
    if reasons:
        lines += ["", "n/a:"] + [f"- {h}: {_one_line(r)}" for h, r in reasons.items()]
    return "\n".join(lines) + "\n"


def plot_views(path: Path, result: EvalResult, columns: Sequence[str] = ("identity", "detect_rate")) -> Path | None:
    """Identity distance and detection rate (or ``columns``) against yaw, one line per pitch."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    from ophav_core.stages.data import atomic_write_bytes

    names = [c for c in columns if c in result.columns]
    if not names:
        return None
    rows = result.rows
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for pitch in sorted({r["pitch"] for r in rows}):
            points = [(r["yaw"], r[name]) for r in rows if r["pitch"] == pitch and r[name] is not None]
            if points:
                ax.plot(*zip(*sorted(points)), marker="o", label=f"pitch {pitch:+g}")
        column = result.columns[name]
        if name == "identity":
            ax.axhline(0.6, color="grey", linestyle="--", linewidth=1, label="same-person threshold 0.6")
        ax.set_title(column.header)
        ax.set_xlabel("yaw (degrees)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(f"{result.label or 'avatar'}: novel views", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_outputs(out: Path, results: Sequence[EvalResult], extra: dict[str, Any] | None = None) -> str:
    """metrics.json, table.md and compare.png (renders above their frames) in ``out``; for novel views also
    views.md (per angle) and views.png (identity and detection against yaw). Returns the table(s)."""
    from ophav_core.media import contact_sheet, pick_evenly, save_png
    from ophav_core.pipeline.scheduler import write_json

    out.mkdir(parents=True, exist_ok=True)
    rows = [r.to_json() for r in results]
    table = markdown_table(rows)
    write_json(out / "metrics.json", {"results": rows, **(extra or {})})
    for i, result in enumerate(results):
        suffix = "" if len(results) == 1 else f"_{i}"
        if result.protocol == "views":
            views = views_table(result)
            (out / f"views{suffix}.md").write_text(views)
            plot_views(out / f"views{suffix}.png", result)
            table = views + "\n" + table
        pick = np.arange(len(result.pred)) if result.protocol == "views" and len(result.pred) <= 9 \
            else pick_evenly(len(result.pred), 6)
        tiles = [result.pred[j] for j in pick]
        if result.protocol == "views":
            labels = [f"yaw {result.settings['yaw'][j]:+.0f} pitch {result.settings['pitch'][j]:+.0f}" for j in pick]
        else:
            labels = [f"render #{j}" for j in pick]
        if result.target is not None:
            tiles += [result.target[j] for j in pick]
            labels += [f"frame #{j}" for j in pick]
        save_png(out / f"compare{suffix}.png", contact_sheet(tiles, columns=len(pick), labels=labels))
    (out / "table.md").write_text(table)
    return table


__all__ = ["PAPER_METRICS", "VIEW_METRICS", "TURNTABLE_YAWS", "GRID_PITCHES", "EvalResult", "self_reenactment",
           "cross_reenactment", "novel_views", "score_images", "markdown_table", "views_table", "plot_views",
           "parse_metrics", "available_metrics", "column_info", "load_reference", "write_outputs", "uncomposite",
           "matte", "tracked_head_region", "region_around"]
