"""Contract checks any stage implementation can run against itself.

Each ``check_*`` function exercises one component through its stage's public interface and asserts what every
implementation of that stage must guarantee (types, shapes, value ranges, determinism where promised). Use them
from your plugin's tests::

    from ophav_core.testing import contracts

    def test_my_restorer_contract():
        contracts.check_restorer(MyRestorer(MyRestorer.Options(), contracts.tiny_context()))
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from ophav_core.stages.motion import Motion, default_script, motion_from_script
from ophav_core.profiles import PROFILES
from ophav_core.stages import (AvatarCheckpoint, AvatarField, FrameSet, Image2Video, MaskSet, Portrait, RenderRequest,
                               RenderResult, RestoreInput, Restorer, RunContext, Segmenter, Tracker, Tracking)
from ophav_core.testing.synthetic import (render_synthetic, synthetic_portrait, synthetic_restore_input,
                                          synthetic_tracking)


def tiny_context(work_dir: Path | None = None, device: str = "cpu", profile: str = "tiny") -> RunContext:
    """A quiet context for tests; components drawing on another stage get the registry's default for it."""
    from ophav_core.components import registry_components

    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="ophav-contract-"))
        # A test suite builds hundreds of these; remove them when the process ends rather than leave them in /tmp.
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    return RunContext(device=device, profile=PROFILES[profile], seed=0, work_dir=Path(work_dir), quiet=True,
                      components=registry_components())


def check_options_model(component_cls) -> None:
    """The options model forbids unknown keys and builds with no arguments."""
    from pydantic import ValidationError

    model = component_cls.Options
    model()
    try:
        model(this_option_does_not_exist=1)
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{component_cls.__name__}.Options accepts unknown options; set extra='forbid'")


def check_image2video(component: Image2Video, portrait: Portrait | None = None, motion: Motion | None = None) -> FrameSet:
    assert isinstance(component, Image2Video)
    check_options_model(type(component))
    portrait = portrait or synthetic_portrait(64)
    motion = motion or motion_from_script(default_script(), fps=5, duration=2)
    frames = component.generate(portrait, motion)
    assert isinstance(frames, FrameSet), f"generate() returned {type(frames).__name__}, not a FrameSet"
    assert len(frames) == len(motion), f"{len(frames)} frames for a motion of {len(motion)}"
    assert frames.fps == motion.fps, f"fps {frames.fps} != motion fps {motion.fps}"
    assert frames.frames.dtype == np.uint8
    w, h = frames.size
    assert w == h, f"frames must be square, got {w}x{h}"
    assert frames.frames.std(axis=0).mean() > 0.5, "every frame is the same: the motion did not move anything"
    return frames


def check_segmenter(component: Segmenter, frames: FrameSet | None = None, tracking: Tracking | None = None) -> MaskSet:
    assert isinstance(component, Segmenter)
    check_options_model(type(component))
    if frames is None:
        tracking = synthetic_tracking(4, 64)
        frames, _ = render_synthetic(tracking)
    masks = component.segment(frames, tracking)
    assert isinstance(masks, MaskSet), f"segment() returned {type(masks).__name__}, not a MaskSet"
    masks.check_matches(frames)
    assert masks.alpha.dtype == np.float32
    assert 0.0 <= masks.alpha.min() and masks.alpha.max() <= 1.0
    # What ``prepare`` made beforehand (in a worker thread, as ``ophav preprocess`` calls it) changes nothing.
    worker = threading.Thread(target=component.prepare, args=(frames,))
    worker.start()
    worker.join()
    prepared = component.segment(frames, tracking)
    np.testing.assert_allclose(prepared.alpha, masks.alpha, atol=1e-6,
                               err_msg="segment() after prepare() gives other masks than without it")
    return masks


def check_tracker(component: Tracker, frames: FrameSet, min_valid: float = 0.9) -> Tracking:
    assert isinstance(component, Tracker)
    check_options_model(type(component))
    tracking = component.track(frames)
    assert isinstance(tracking, Tracking), f"track() returned {type(tracking).__name__}, not a Tracking"
    tracking.check_matches(frames)
    if tracking.valid is not None:
        assert tracking.valid.mean() >= min_valid, f"a face was found in only {tracking.valid.mean():.0%} of frames"
    rebuilt = tracking.mesh_for(tracking.rotation, tracking.translation, tracking.expression)
    err = np.abs(rebuilt - tracking.vertices).max() / max(np.ptp(tracking.canonical_vertices), 1e-6)
    assert err < 1e-3, f"vertices disagree with R (canonical + basis . expression) + t by {err:.2e} of the mesh size"
    ortho = np.abs(tracking.rotation @ np.transpose(tracking.rotation, (0, 2, 1)) - np.eye(3)).max()
    assert ortho < 1e-3, f"rotations are not orthonormal (error {ortho:.2e})"
    assert (np.linalg.det(tracking.rotation) > 0).all(), "a rotation is a reflection"
    assert (tracking.vertices[..., 2] > 0).all(), "mesh vertices behind the camera"
    tracking.landmarks5()  # the semantic groups that restorers align with are there
    reference = component.track(frames, reference=tracking)
    assert reference.expression_basis.shape == tracking.expression_basis.shape
    return tracking


def check_field(component: AvatarField, work_dir: Path | None = None, size: int = 32, iterations: int = 5,
                tracking: Tracking | None = None, frames: FrameSet | None = None, masks: MaskSet | None = None) -> AvatarCheckpoint:
    """Fit, continue fitting, render, save and reload; the reloaded avatar renders the same images."""
    assert isinstance(component, AvatarField)
    check_options_model(type(component))
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ophav-field-"))
    if tracking is None:
        tracking = synthetic_tracking(4, size)
        frames, masks = render_synthetic(tracking)
    first = component.fit(frames, masks, tracking, work_dir / "a.ckpt", iterations=iterations)
    assert first.path.is_file(), "fit() wrote no checkpoint"
    second = component.fit(frames, masks, tracking, work_dir / "b.ckpt", init=first, iterations=iterations)
    request = RenderRequest.from_tracking(tracking, np.arange(2))
    out = component.render(second, request)
    assert isinstance(out, RenderResult) and len(out) == 2
    w, h = (int(s) for s in request.resolution)
    assert out.rgb.shape == (2, h, w, 3) and out.rgb.dtype == np.uint8
    reloaded = component.load(second.path)
    again = component.render(reloaded, request)
    assert np.array_equal(out.rgb, again.rgb), "a reloaded checkpoint renders different images"
    assert np.allclose(out.alpha, again.alpha, atol=1e-6)
    return second


def check_restorer(component: Restorer, batch: RestoreInput | None = None) -> np.ndarray:
    assert isinstance(component, Restorer)
    check_options_model(type(component))
    batch = batch or synthetic_restore_input(2, 64)
    out = component.restore(batch)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8, "restore() must return a uint8 array"
    assert out.shape == batch.images.shape, f"restored shape {out.shape} != input shape {batch.images.shape}"
    return out


def synthetic_metric_inputs(num: int = 4, size: int = 64, protocol: str = "self", seed: int = 0):
    """MetricInputs with every input of :data:`~ophav_core.stages.metric.INPUTS` filled from the synthetic head
    (renders = the synthetic frames slightly changed, ground truth = the frames), so any metric can run."""
    from ophav_core.study.evaluation import matte, tracked_head_region
    from ophav_core.stages.metric import MetricInputs

    tracking = synthetic_tracking(num, size, seed=seed)
    frames, masks = render_synthetic(tracking)
    rng = np.random.default_rng(seed)
    target = matte(frames.frames, masks.alpha)
    pred = np.clip(target.astype(np.int16) + rng.integers(-6, 7, target.shape), 0, 255).astype(np.uint8)
    portrait = synthetic_portrait(size, seed).image
    given = {"alpha": masks.alpha, "target": target, "region": masks.alpha > 0.5, "frames": frames.frames,
             "real_heads": target, "portrait": portrait, "neutral": target[:1],
             "head_region": tracked_head_region(tracking), "render_tracking": tracking, "template": tracking,
             "reference_tracking": tracking, "identity_reference": (target, tracking.landmarks5()), "fps": 5.0,
             "device": "cpu"}
    return MetricInputs(protocol, pred, given=given)


def check_metric(spec, inputs=None) -> dict:
    """What every metric plugin must guarantee: a well-formed :class:`~ophav_core.stages.metric.MetricSpec`; a
    compute that (given every input it needs) returns its declared columns, each one value per render or one
    for the set, finite or NaN, the same twice; and, missing any input it declares in ``needs`` (or a required
    package), an ``n/a`` reason instead of a number. Returns the computed columns ({} when the metric cannot run
    here: its packages or weights are missing, which the reason says)."""
    from ophav_core.stages.metric import INPUTS, MetricInputs, MetricSpec
    from ophav_core.study.metrics import compute_metric

    assert isinstance(spec, MetricSpec), f"register() takes a MetricSpec, got {type(spec).__name__}"
    assert spec.definition.strip(), f"metric {spec.name!r} has no definition (what exactly is measured?)"
    assert all(n in INPUTS for n in spec.needs)
    names = [c.name for c in spec.columns()]
    assert len(set(names)) == len(names) and names[0] == spec.name
    if not spec.missing_requirements():
        assert callable(spec.compute_function()), f"metric {spec.name!r}: compute does not resolve to a callable"
    inputs = inputs or synthetic_metric_inputs()
    values, reason = compute_metric(spec, inputs)
    if values is None:
        assert reason and isinstance(reason, str), f"metric {spec.name!r}: n/a without a reason"
        return {}
    assert set(values) <= set(names), f"metric {spec.name!r} returned undeclared columns {sorted(values)}"
    again, _ = compute_metric(spec, inputs)
    for name, value in values.items():
        if isinstance(value, Exception):
            assert str(value), f"metric {spec.name!r}: column {name} is n/a without a reason"
            continue
        arr = np.asarray(value, np.float64)
        assert arr.ndim == 0 or arr.shape == (len(inputs),), f"{spec.name}.{name}: shape {arr.shape}"
        assert not np.isinf(arr).any(), f"{spec.name}.{name}: infinite values (use NaN for 'not measurable')"
        np.testing.assert_allclose(np.asarray(again[name], np.float64), arr, rtol=1e-9, atol=0, equal_nan=True,
                                   err_msg=f"{spec.name}.{name} differs between two identical calls")
    for need in spec.needs:  # without a needed input: n/a with a reason, never a number
        given = {k: inputs.get(k) for k in INPUTS if k != need and k != "pred" and inputs.has(k)}
        partial = MetricInputs(inputs.protocol, inputs.pred, given=given, unavailable={need: f"test: no {need}"})
        missing_values, missing_reason = compute_metric(spec, partial)
        assert missing_values is None and missing_reason == f"test: no {need}", \
            f"metric {spec.name!r} computed without its declared need {need!r}"
    return values
