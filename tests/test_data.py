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
