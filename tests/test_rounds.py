"""The iterative dataset update's mechanics: which views a round renders, which renders it keeps, what it trains on."""
import numpy as np
import pytest

from ophav_core.pipeline.animate import pose_angles, tracking_for_request, widening_views
from ophav_core.pipeline.scheduler import RENDER_CHECK_TOLERANCE, check_renders, refit_dataset
from ophav_core.stages import FrameSet, MaskSet, RenderResult, Tracking
from ophav_core.testing.synthetic import synthetic_tracking


def test_widening_views_cover_the_tracked_range_grown_by_the_widening():
    tracking = synthetic_tracking(40, 64, max_yaw=30.0)
    yaw, _ = pose_angles(tracking)
    lo, hi = np.percentile(yaw, 2), np.percentile(yaw, 98)
    rng = np.random.default_rng(0)
    plain = pose_angles(tracking_for_request(tracking, widening_views(tracking, 400, rng)))[0]
    wide = pose_angles(tracking_for_request(tracking, widening_views(tracking, 400, rng, widen_yaw=15.0)))[0]
    # Every view lies in the range (small pitch makes yaw compose almost additively), and the range is used.
    assert plain.min() > lo - 2 and plain.max() < hi + 2
    assert plain.min() < lo + 5 and plain.max() > hi - 5
    assert wide.min() < lo - 10 and wide.max() > hi + 10 and wide.min() > lo - 17 and wide.max() < hi + 17


class _Tracker:
    """Finds the face where the views put it, shifted by ``error`` inter-ocular distances, in frames whose
    mean brightness is above 20 (a dark frame stands for a render that dissolved)."""

    def __init__(self, error: float):
        self.error = error

    def track(self, frames, *, single_image=False, reference=None, source=""):
        landmarks = reference.landmarks5()
        ocular = np.linalg.norm(landmarks[:, 0] - landmarks[:, 1], axis=-1)
        shift = self.error * ocular
        vertices = reference.vertices.copy()
        # Moving every vertex by `shift` pixels in x moves the projected landmarks by about that much.
        depth = vertices[..., 2]
        vertices[..., 0] += shift[:, None] * depth / reference.K[0, 0]
        valid = frames.frames.reshape(len(frames), -1).mean(axis=1) > 20
        return Tracking(K=reference.K, image_size=reference.image_size, rotation=reference.rotation,
                        translation=reference.translation, expression=reference.expression, vertices=vertices,
                        canonical_vertices=reference.canonical_vertices, expression_basis=reference.expression_basis,
                        valid=valid, **reference.topology.tracking_fields())


def _renders(views: Tracking, dark: list[int]) -> RenderResult:
    n = len(views)
    width, height = (int(s) for s in views.image_size)
    rgb = np.full((n, height, width, 3), 128, np.uint8)
    rgb[dark] = 0
    return RenderResult(rgb=rgb, alpha=np.ones((n, height, width), np.float32),
                        depth=np.ones((n, height, width), np.float32))


def test_check_renders_keeps_renders_whose_face_is_where_it_should_be():
    views = synthetic_tracking(6, 64)
    renders = _renders(views, dark=[2])
    close = check_renders(_Tracker(0.5 * RENDER_CHECK_TOLERANCE), renders, views)
    assert close["kept"] == [True, True, False, True, True, True]
    assert close["face_found"][2] is False and close["landmark_error"][2] is None
    far = check_renders(_Tracker(2 * RENDER_CHECK_TOLERANCE), renders, views)
    assert not any(far["kept"])
    assert all(e > RENDER_CHECK_TOLERANCE for e in far["landmark_error"] if e is not None)


class _HalfSegmenter:
    """Calls only the left half of every image head."""

    def segment(self, frames, tracking=None):
        alpha = np.zeros(frames.frames.shape[:3], np.float32)
        alpha[:, :, : alpha.shape[2] // 2] = 1.0
        return MaskSet(alpha)


def test_refit_trains_on_the_coarse_video_plus_the_kept_renders_cut_to_the_head():
    tracking = synthetic_tracking(12, 32)
    frames = FrameSet(np.full((12, 32, 32, 3), 50, np.uint8), fps=10)
    masks = MaskSet(np.full((12, 32, 32), 0.5, np.float32))
    views = synthetic_tracking(4, 32, seed=1)
    restored = FrameSet(np.full((4, 32, 32, 3), 200, np.uint8), fps=10)
    renders = _renders(views, dark=[])
    kept = np.array([True, False, True, False])
    data_frames, data_masks, data_tracking = refit_dataset(frames, masks, tracking, restored, renders, views, kept,
                                                           _HalfSegmenter())
    # 2 kept renders, repeated 3 times (about a third of 12 + 6 frames), after the 12 coarse frames.
    assert len(data_frames) == len(data_masks) == len(data_tracking) == 18
    assert (data_frames.frames[:12] == 50).all() and (data_frames.frames[12:] == 200).all()
    np.testing.assert_array_equal(data_tracking.rotation[12:14], views.rotation[[0, 2]])
    assert np.allclose(data_masks.alpha[:12], 0.5)
    assert (data_masks.alpha[12:, :, :16] == 1).all() and (data_masks.alpha[12:, :, 16:] == 0).all()
    # Nothing kept: the coarse video alone.
    alone = refit_dataset(frames, masks, tracking, restored, renders, views, np.zeros(4, bool), _HalfSegmenter())
    assert len(alone[0]) == 12


def test_joined_refuses_another_mesh():
    a, b = synthetic_tracking(3, 32), synthetic_tracking(2, 32)
    assert len(a.joined(b)) == 5
    with pytest.raises(Exception, match="different cameras"):
        a.joined(synthetic_tracking(2, 48))


def test_keep_the_head_cuts_a_blob_beside_the_face():
    pytest.importorskip("cv2")
    from ophav_mediapipe.segmenter import keep_the_head

    alpha = np.zeros((64, 64), np.float32)
    alpha[10:40, 20:44] = 1.0  # the head
    alpha[50:58, 2:12] = 0.8  # a collar beside the jaw, not connected
    region = np.zeros_like(alpha)
    region[15:35, 25:40] = 1.0
    kept = keep_the_head(alpha, region)
    assert kept[50:58, 2:12].max() == 0 and (kept[10:40, 20:44] == 1).all()
    single = np.zeros_like(alpha)
    single[10:40, 20:44] = 1.0
    np.testing.assert_array_equal(keep_the_head(single, region), single)
