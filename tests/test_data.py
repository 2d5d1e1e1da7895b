import numpy as np
import pytest

from ophav_core.errors import InvalidData
from ophav_core.stages import FrameSet, MaskSet, Portrait, RenderRequest, Tracking
from ophav_core.testing.synthetic import synthetic_tracking


def test_frameset_rejects_bad_shapes_and_types():
    with pytest.raises(InvalidData, match="frames"):
        FrameSet(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InvalidData, match="uint8"):
        FrameSet(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InvalidData, match="fps"):
        FrameSet(np.zeros((2, 8, 8, 3), np.uint8), fps=0)
    with pytest.raises(InvalidData, match="driving"):
        FrameSet(np.zeros((2, 8, 8, 3), np.uint8), driving={"yaw": np.zeros(3)})


def test_tracking_rejects_nan_and_count_mismatch():
    t = synthetic_tracking(4, 32)
    arrays = {k: v for k, v in t.to_arrays().items()}
    bad = dict(arrays)
    bad["translation"] = arrays["translation"].copy()
    bad["translation"][1, 2] = np.nan
    with pytest.raises(InvalidData, match="translation.*NaN"):
        Tracking.from_arrays(bad)
    bad = dict(arrays)
    bad["expression"] = arrays["expression"][:3]
    with pytest.raises(InvalidData, match="N=3.*N=4|N=4.*N=3"):
        Tracking.from_arrays(bad)
    bad = dict(arrays)
    bad["faces"] = arrays["faces"].copy()
    bad["faces"][0, 0] = 10_000
    with pytest.raises(InvalidData, match="faces"):
        Tracking.from_arrays(bad)


def test_masks_must_match_frames_and_range():
    frames = FrameSet(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(InvalidData, match=r"\[0, 1\]"):
        MaskSet(np.full((2, 8, 8), 1.5, np.float32))
    with pytest.raises(InvalidData, match="shape"):
        MaskSet(np.zeros((3, 8, 8), np.float32)).check_matches(frames)


def test_roundtrip_through_npz(tmp_path):
    t = synthetic_tracking(3, 32)
    t.save(tmp_path / "t.npz")
    back = Tracking.load(tmp_path / "t.npz")
    assert np.array_equal(back.vertices, t.vertices)
    assert back.semantic.keys() == t.semantic.keys()
    assert back.mesh_type == t.mesh_type
    with pytest.raises(InvalidData, match="expected a ophav.FrameSet"):
        FrameSet.load(tmp_path / "t.npz")


def test_tracking_mesh_and_landmarks_are_consistent():
    t = synthetic_tracking(3, 64)
    rebuilt = t.mesh_for(t.rotation, t.translation, t.expression)
    assert np.allclose(rebuilt, t.vertices, atol=1e-4)
    lm = t.landmarks5()
    assert lm.shape == (3, 5, 2)
    # The subject's left eye appears on the image right of the right eye for a frontal face.
    assert (lm[:, 0, 0] > lm[:, 1, 0]).all()


def test_render_request_from_tracking_scales_intrinsics():
    t = synthetic_tracking(2, 64)
    r = RenderRequest.from_tracking(t, resolution=(128, 128))
    assert r.K[0, 0, 0] == pytest.approx(2 * t.K[0, 0])
    assert tuple(r.resolution) == (128, 128)


def test_portrait_too_small():
    with pytest.raises(InvalidData, match="too small"):
        Portrait(np.zeros((10, 10, 3), np.uint8))


def test_posed_onto_recovers_the_pose_a_mesh_was_drawn_with():
    """A tracking whose poses are off by up to 12 degrees, posed onto the true mesh seen through another
    camera, with part of the face moved in a way its expression does not explain."""
    import dataclasses

    from ophav_core.stages.motion import euler_to_matrix, rotation_angle

    truth = synthetic_tracking(num_frames=6, max_yaw=50.0)
    rng = np.random.default_rng(1)
    wrong = euler_to_matrix(rng.uniform(-12, 12, 6), rng.uniform(-6, 6, 6), rng.uniform(-4, 4, 6))
    rotation = (wrong @ truth.rotation).astype(np.float32)
    translation = truth.translation + rng.normal(0, 1.5, truth.translation.shape).astype(np.float32)
    tracked = dataclasses.replace(truth, rotation=rotation, translation=translation,
                                  vertices=truth.mesh_for(rotation, translation, truth.expression).astype(np.float32))
    drawn = truth.vertices.astype(np.float64).copy()
    moved = truth.canonical_vertices[:, 1] > 7.0  # the chin region: an expression the tracking did not read
    drawn[:, moved] += np.array([0.0, 0.8, 0.0])
    # The same points through a camera with another focal length and centre: same depth, other pixels.
    camera = truth.K.copy()
    camera[0, 0] *= 1.3
    camera[1, 1] *= 1.3
    camera[:2, 2] += 4.0
    seen = drawn.copy()
    seen[..., :2] = ((drawn[..., :2] / drawn[..., 2:]) * truth.K[[0, 1], [0, 1]] + truth.K[:2, 2] - camera[:2, 2]) \
        / camera[[0, 1], [0, 1]] * drawn[..., 2:]
    posed = tracked.posed_onto(seen, camera)
    assert np.array_equal(posed.expression, tracked.expression)
    angle = rotation_angle(np.swapaxes(posed.rotation, 1, 2) @ truth.rotation)
    before = rotation_angle(np.swapaxes(tracked.rotation, 1, 2) @ truth.rotation)
    assert before.max() > 5.0
    assert angle.max() < 1.0, f"pose error after refitting: {angle.round(2)} degrees"
    pixels = np.linalg.norm(posed.project(posed.vertices) - truth.project(truth.vertices), axis=-1)
    was = np.linalg.norm(tracked.project(tracked.vertices) - truth.project(truth.vertices), axis=-1)
    assert np.median(pixels[:, ~moved]) < 0.5 < np.median(was[:, ~moved]), \
        "the unmoved vertices must project where they were drawn (64 px frames)"
    with pytest.raises(InvalidData, match="posed_onto"):
        tracked.posed_onto(seen[:, :10])
