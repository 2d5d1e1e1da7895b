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


def _symmetric_tracking(frames: int = 6, size: int = 64, offset_x: float = 0.0) -> Tracking:
    """The synthetic head with a mirror map, its canonical shape moved ``offset_x`` off the plane x = 0, and an
    expression basis made of mirror pairs (component k + E/2 is component k's mirror image)."""
    base = synthetic_tracking(frames, size)
    canonical = base.canonical_vertices.astype(np.float64)
    mirrored = canonical * [-1.0, 1.0, 1.0]
    symmetry = ((mirrored[:, None] - canonical[None]) ** 2).sum(-1).argmin(axis=1)
    half = base.expression_basis
    basis = np.concatenate([half, half[:, symmetry] * np.array([-1.0, 1.0, 1.0], np.float32)])
    rng = np.random.default_rng(3)
    expression = rng.uniform(-1, 1, (frames, basis.shape[0])).astype(np.float32)
    canonical = (canonical + [offset_x, 0.0, 0.0]).astype(np.float32)
    local = canonical[None] + np.einsum("ne,evc->nvc", expression, basis)
    vertices = np.einsum("nij,nvj->nvi", base.rotation, local) + base.translation[:, None]
    fields = base.topology.tracking_fields()
    fields["symmetry"] = symmetry
    return Tracking(K=base.K, image_size=base.image_size, rotation=base.rotation, translation=base.translation,
                    expression=expression, vertices=vertices, canonical_vertices=canonical, expression_basis=basis,
                    valid=base.valid, **fields)


@pytest.mark.parametrize("offset_x", [0.0, 0.7])
def test_a_mirrored_view_flipped_shows_the_original_view(offset_x):
    from ophav_core.pipeline.animate import mirrored_request
    from ophav_core.stages import RenderRequest

    tracking = _symmetric_tracking(offset_x=offset_x)
    request = RenderRequest.from_tracking(tracking)
    trained = np.random.default_rng(1).normal(0.0, 1.0, (500, tracking.expression.shape[1]))
    mirrored = mirrored_request(tracking, request, observed=trained)
    yaw, _ = pose_angles(tracking)
    np.testing.assert_allclose(pose_angles(tracking_for_request(tracking, mirrored))[0], -yaw, atol=1e-3)
    # The mirror pairs of the basis swap.
    half = tracking.expression.shape[1] // 2
    np.testing.assert_allclose(mirrored.expression[:, :half], request.expression[:, half:], atol=0.02)
    # Vertex i of the mirrored view, flipped (x -> W - 1 - x), lands where vertex symmetry[i] of the view is.
    vertices = tracking.mesh_for(mirrored.rotation, mirrored.translation, mirrored.expression)
    pixels = np.stack([tracking.project(vertices[i], mirrored.K[i]) for i in range(len(request))])
    pixels[..., 0] = (tracking.image_size[0] - 1) - pixels[..., 0]
    original = tracking.project(tracking.vertices)
    np.testing.assert_allclose(pixels, original[:, tracking.symmetry], atol=0.05)  # (the prior shrinks a little)


def test_a_mesh_without_a_mirror_map_has_no_mirrored_view():
    from ophav_core.pipeline.animate import mirrored_request
    from ophav_core.stages import RenderRequest

    tracking = synthetic_tracking(3, 32)
    assert mirrored_request(tracking, RenderRequest.from_tracking(tracking)) is None


def test_symmetric_views_reach_the_mirror_of_the_tracked_range():
    tracking = synthetic_tracking(40, 64, max_yaw=30.0)
    turned = Tracking(**{**_fields(tracking), "rotation": tracking.rotation @ _yaw(20.0)})  # yaw -10 .. 50
    yaw, _ = pose_angles(turned)
    rng = np.random.default_rng(0)
    plain = pose_angles(tracking_for_request(turned, widening_views(turned, 400, rng)))[0]
    both = pose_angles(tracking_for_request(turned, widening_views(turned, 400, rng, symmetric=True)))[0]
    assert plain.min() > np.percentile(yaw, 2) - 2
    assert both.min() < -np.percentile(yaw, 98) + 5 and both.max() < np.percentile(yaw, 98) + 2


def _yaw(degrees: float) -> np.ndarray:
    from ophav_core.stages.motion import euler_to_matrix

    return euler_to_matrix(np.array([degrees]), np.zeros(1), np.zeros(1))[0].astype(np.float32)


def _fields(tracking: Tracking) -> dict:
    return dict(K=tracking.K, image_size=tracking.image_size, rotation=tracking.rotation,
                translation=tracking.translation, expression=tracking.expression, vertices=tracking.vertices,
                canonical_vertices=tracking.canonical_vertices, expression_basis=tracking.expression_basis,
                valid=tracking.valid, **tracking.topology.tracking_fields())


class _LeftSideTracker:
    """Finds the face where the views put it in frames whose left half is bright (stands for the side of the
    head the avatar learned), nowhere else."""

    def track(self, frames, *, single_image=False, reference=None, source=""):
        half = frames.frames.shape[2] // 2
        valid = frames.frames[:, :, :half].mean(axis=(1, 2, 3)) > 100
        return Tracking(**{**_fields(reference), "valid": valid})


def test_a_rejected_render_is_taken_from_its_mirror_view_when_that_one_reads_as_the_face():
    from ophav_core.pipeline.animate import mirrored_request
    from ophav_core.pipeline.scheduler import mirror_rejected
    from ophav_core.stages import RenderRequest

    views = _symmetric_tracking(4, 32)
    request = RenderRequest.from_tracking(views)
    rgb = np.zeros((4, 32, 32, 3), np.uint8)
    rgb[[0, 2], :, :16] = 200  # views 0 and 2 render well; 1 and 3 show their good side on the right
    rgb[[1, 3], :, 16:] = 200
    rgb[3, :, :] = 0  # view 3 cannot be drawn from either side
    renders = RenderResult(rgb=rgb, alpha=np.ones((4, 32, 32), np.float32), depth=np.ones((4, 32, 32), np.float32))
    tracker = _LeftSideTracker()
    checks = check_renders(tracker, renders, views)
    assert checks["kept"] == [True, False, True, False]
    asked = []

    def render(req):
        asked.append(req)
        return RenderResult(rgb=rgb[[1, 3]], alpha=renders.alpha[:2], depth=renders.depth[:2])

    out, after = mirror_rejected(render, tracker, views, request, views, renders, checks)
    # Only the two rejected views were drawn again, from their mirror views.
    expected = mirrored_request(views, request).subset(np.array([1, 3]))
    np.testing.assert_allclose(asked[0].rotation, expected.rotation, atol=1e-6)
    assert after["kept"] == [True, True, True, False] and after["mirrored"] == [False, True, False, False]
    assert (out.rgb[1, :, :16] == 200).all() and (out.rgb[1, :, 16:] == 0).all()  # flipped into place
    np.testing.assert_array_equal(out.rgb[[0, 2, 3]], rgb[[0, 2, 3]])
    assert after["landmark_error"][1] is not None


def _turned_symmetric(frames: int, size: int, degrees: float) -> Tracking:
    """``_symmetric_tracking`` with every head turned ``degrees`` further (so the yaw range is lopsided)."""
    base = _symmetric_tracking(frames, size)
    rotation = base.rotation @ _yaw(degrees)
    local = base.canonical_vertices[None] + np.einsum("ne,evc->nvc", base.expression, base.expression_basis)
    vertices = np.einsum("nij,nvj->nvi", rotation, local) + base.translation[:, None]
    return Tracking(**{**_fields(base), "rotation": rotation, "vertices": vertices})


def test_mirrored_frames_teach_the_yaw_the_video_never_reached_and_show_the_mirror_image():
    from ophav_core.pipeline.animate import mirrored_frames

    tracking = _turned_symmetric(40, 64, 20.0)  # yaw about -10 .. +50
    yaw, _ = pose_angles(tracking)
    lo, hi = np.percentile(yaw, 2), np.percentile(yaw, 98)
    n, size = len(tracking), 64
    # Each frame shows one bright pixel where vertex 0 projects; the mask is the left half.
    images = np.zeros((n, size, size, 3), np.uint8)
    pixel = tracking.project(tracking.vertices[:, 0]).round().astype(int)
    images[np.arange(n), pixel[:, 1], pixel[:, 0]] = 255
    alpha = np.zeros((n, size, size), np.float32)
    alpha[:, :, : size // 2] = 1.0
    frames, masks, views, index = mirrored_frames(FrameSet(images, fps=10.0), MaskSet(alpha), tracking)
    # Exactly the frames whose mirror lies beyond the other side: turned further right than the video turns left.
    np.testing.assert_array_equal(index, np.flatnonzero(-yaw < lo))
    assert len(index) > 5 and (yaw[index] > -lo).all()
    mirrored_yaw = pose_angles(views)[0]
    np.testing.assert_allclose(mirrored_yaw, -yaw[index], atol=1e-3)
    assert mirrored_yaw.max() < lo and mirrored_yaw.min() > -hi - 1
    # The flipped image's bright pixel is where the mirrored tracking puts vertex 0's mirror vertex.
    bright = np.argwhere(frames.frames[..., 0] == 255)
    assert len(bright) == len(index)
    expected = views.project(views.vertices[:, tracking.symmetry[0]])
    np.testing.assert_allclose(bright[:, [2, 1]], expected, atol=0.6)  # rounding to a pixel: 0.5
    assert (masks.alpha[:, :, size // 2:] == 1).all() and (masks.alpha[:, :, : size // 2] == 0).all()
    # The mirrored views join the video's tracking (same camera and mesh), as every training takes them.
    assert len(tracking.joined(views)) == n + len(index)


def test_no_mirrored_frames_without_a_mirror_map_or_a_lopsided_video():
    from ophav_core.pipeline.animate import mirrored_frames

    plain = synthetic_tracking(8, 32)
    frames = FrameSet(np.zeros((8, 32, 32, 3), np.uint8), fps=10.0)
    masks = MaskSet(np.ones((8, 32, 32), np.float32))
    assert mirrored_frames(frames, masks, plain) is None
    # Symmetric about frontal: at most the frames past the 98th percentile come back, a few of 40.
    level = _symmetric_tracking(40, 32)
    out = mirrored_frames(FrameSet(np.zeros((40, 32, 32, 3), np.uint8), fps=10.0),
                          MaskSet(np.ones((40, 32, 32), np.float32)), level)
    assert out is None or len(out[3]) <= 2
