"""Tracker and segmenter ``mediapipe`` (plugins/ophav_mediapipe)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe")
pytest.importorskip("cv2")

from ophav_core.errors import NoFaceFound  # noqa: E402
from ophav_core.stages.motion import Motion, matrix_to_euler  # noqa: E402
from ophav_core.stages import FrameSet, Tracking  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_mediapipe.blendshapes import NAMES, named_offsets  # noqa: E402
from ophav_mediapipe.mesh import SEMANTIC, load_canonical_mesh  # noqa: E402
from ophav_mediapipe.segmenter import MediapipeSegmenter  # noqa: E402
from ophav_mediapipe.tracker import MediapipeTracker  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TALK = DATA / "driving" / "talk_78f.mp4"
NOD = DATA / "driving" / "nod_175f.mp4"
needs_data = pytest.mark.skipif(not TALK.exists(), reason=f"shared test data not found at {DATA}")


def _reprojection_error(tracking: Tracking) -> np.ndarray:
    """Per-frame mean distance between the projected mesh and the detected landmarks, in face widths."""
    proj = tracking.project(tracking.vertices.astype(np.float64))
    err = np.linalg.norm(proj - tracking.landmarks, axis=-1).mean(axis=1)
    return err / np.ptp(tracking.landmarks[..., 0], axis=1)


@pytest.fixture(scope="module")
def tracker() -> MediapipeTracker:
    return MediapipeTracker(context=contracts.tiny_context())


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def clip() -> FrameSet:
    if not TALK.exists():
        pytest.skip(f"{TALK} not found")
    from ophav_core.media import read_video

    return read_video(TALK, max_frames=10)


def test_canonical_mesh_data_and_orientation():
    vertices, faces, uv = load_canonical_mesh()
    assert vertices.shape == (468, 3) and faces.shape == (898, 3) and uv.shape == (468, 2)
    assert faces.dtype == np.int32 and faces.min() == 0 and faces.max() == 467
    assert 14.0 < np.ptp(vertices[:, 0]) < 17.0, "face width in cm"
    assert vertices[SEMANTIC["left_eye"], 0].mean() > 0 > vertices[SEMANTIC["right_eye"], 0].mean()
    assert vertices[SEMANTIC["brows"], 1].mean() < vertices[SEMANTIC["nose"], 1].mean() < vertices[SEMANTIC["jaw"], 1].max()
    assert vertices[1, 2] == pytest.approx(vertices[:, 2].min(), abs=0.3), "nose tip is the vertex closest to the camera"
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (normals[:, 2] < 0).mean() > 0.9, "triangles must face the camera (-z) from outside"
    jaw_x = vertices[SEMANTIC["jaw"], 0]
    assert np.all(np.diff(jaw_x) >= 0) and jaw_x[0] < -7 and jaw_x[-1] > 7, "jaw ordered from ear to ear"
    for name in Tracking.REQUIRED_SEMANTIC + ("jaw", "lips_outer", "lips_inner", "left_eye_contour", "right_eye_contour", "brows"):
        assert name in SEMANTIC


def test_named_offsets_move_the_right_parts():
    vertices = load_canonical_mesh()[0]
    off = named_offsets()
    assert set(off) == set(NAMES) and all(o.shape == (468, 3) for o in off.values())
    assert off["mouth_open"][14, 1] - off["mouth_open"][13, 1] > 1.0, "lips separate by more than 1 cm"
    assert off["mouth_open"][152, 1] > 1.5 and abs(off["mouth_open"][10]).max() < 1e-3, "chin down, forehead still"
    assert off["blink"][159, 1] > 0.3 and off["blink"][145, 1] <= 0.0, "upper lid down onto the lower lid"
    assert off["brows_up"][SEMANTIC["brows"], 1].mean() < -0.5
    corners = SEMANTIC["mouth_left"][0], SEMANTIC["mouth_right"][0]
    assert off["smile"][list(corners), 1].max() < -0.3 and off["smile"][corners[0], 0] > 0 > off["smile"][corners[1], 0]
    assert np.linalg.norm(off["smile"][10]) < 1e-3 and vertices.shape == (468, 3)


def test_astronaut_reprojects_and_aligns(tracker, astronaut, tmp_path):
    tracking = tracker.track(FrameSet(astronaut[None]), single_image=True, source="astronaut")
    assert _reprojection_error(tracking)[0] < 0.02
    five = tracking.landmarks5()[0]
    assert five[0, 0] > five[1, 0], "subject's left eye appears on image right"
    assert five[2, 1] < five[3, 1] and five[3, 0] > five[4, 0]
    # Inside the portrait's face box.
    assert 150 < five[2, 0] < 300 and 80 < five[2, 1] < 200
    assert tracking.expression_basis.shape == (32, 468, 3)
    assert 100 < tracking.translation[0, 2] < 160, "astronaut's face is ~94 px wide at f = 768: about 1.3 m away"
    path = tracking.save(tmp_path / "astronaut.npz")
    assert np.array_equal(Tracking.load(path).vertices, tracking.vertices)


@needs_data
def test_yaw_sign_follows_a_horizontal_flip(tracker):
    from ophav_core.media import read_image

    image = read_image(DATA / "portraits" / "Justin_Timberlake_crop.png").image  # face turned to image right
    yaw = [matrix_to_euler(tracker.track(FrameSet(im[None].copy()), single_image=True).rotation)[0][0]
           for im in (image, image[:, ::-1])]
    assert yaw[0] > 5 and yaw[1] < -5 and abs(yaw[0] + yaw[1]) < 3


def test_no_face_in_portrait_names_the_file(tracker):
    grey = np.full((1, 128, 128, 3), 127, np.uint8)
    with pytest.raises(NoFaceFound, match="grey.png"):
        tracker.track(FrameSet(grey), single_image=True, source="grey.png")


def test_two_faces_warn_and_track_the_larger(tracker, astronaut):
    import cv2

    face = astronaut[20:260, 110:350]
    canvas = np.full((300, 600, 3), 200, np.uint8)
    canvas[20:280, 20:280] = cv2.resize(face, (260, 260))
    canvas[60:240, 400:580] = cv2.resize(face, (180, 180))
    with pytest.warns(UserWarning, match="more than one face"):
        tracking = tracker.track(FrameSet(canvas[None]), single_image=True, source="two.png")
    assert tracking.landmarks[0, :, 0].mean() < 300, "the larger face (left) is tracked"


@pytest.fixture(scope="module")
def clip_tracking(tracker, clip) -> tuple[Tracking, FrameSet]:
    frames = clip.frames.copy()
    frames[4:6] = 127  # two frames without a face in the middle of the clip
    gappy = FrameSet(frames, fps=clip.fps)
    with pytest.warns(UserWarning, match=r"talk: no face in 2 of 10 frames \(#4, #5\)"):
        tracking = tracker.track(gappy, source="talk")
    return tracking, gappy


@needs_data
def test_tracker_contract_on_video(tracker, clip):
    tracking = contracts.check_tracker(tracker, clip)
    assert tracking.valid.all()
    assert _reprojection_error(tracking).max() < 0.02
    assert tracking.mesh_type == "mediapipe468"


@needs_data
def test_gap_is_interpolated_and_reported(clip_tracking, tmp_path):
    from ophav_core.media import plot_pose

    tracking, _ = clip_tracking
    assert tracking.valid.tolist() == [True] * 4 + [False] * 2 + [True] * 4
    t = tracking.translation
    expected = t[3] + (t[6] - t[3]) * np.array([[1 / 3], [2 / 3]])
    assert np.allclose(t[4:6], expected, atol=0.05 * np.abs(t[6] - t[3]).max() + 1e-3)
    assert _reprojection_error(tracking.subset(np.nonzero(tracking.valid)[0])).max() < 0.02
    png = plot_pose(tracking, tmp_path / "pose.png", title="talk")
    assert png.stat().st_size > 5000


@needs_data
def test_driving_video_into_another_basis(tracker, clip_tracking):
    from ophav_core.media import read_video

    reference, _ = clip_tracking
    driver = read_video(NOD, max_frames=6)
    tracking = tracker.track(driver, reference=reference, source="nod")
    assert np.array_equal(tracking.expression_basis, reference.expression_basis)
    assert np.array_equal(tracking.canonical_vertices, reference.canonical_vertices)
    assert tracking.expression.shape == (6, reference.num_expressions)
    assert tracking.K[0, 0] == pytest.approx(reference.K[0, 0] / 512 * 480)
    # The avatar's face follows the driver's head: its mesh lands on the driver's face.
    assert _reprojection_error(tracking).mean() < 0.1


def test_expressions_for_opens_the_mouth(tracker, astronaut):
    tracking = tracker.track(FrameSet(astronaut[None]), single_image=True)
    n = 5
    ramp = np.linspace(0, 1, n).astype(np.float32)
    zeros = np.zeros(n, np.float32)
    named = tracker.expressions_for(Motion(25.0, zeros, zeros, zeros, {"mouth_open": ramp}), tracking)
    width = np.ptp(tracking.canonical_vertices[:, 0])
    dense = named_offsets()["mouth_open"][None] * ramp[:, None, None] / np.ptp(load_canonical_mesh()[0][:, 0])
    from_offsets = tracker.expressions_for(Motion(25.0, zeros, zeros, zeros, offsets=dense, topology="mediapipe468"), tracking)
    for coeffs in (named, from_offsets):
        assert coeffs.shape == (n, tracking.num_expressions)
        mesh = tracking.canonical_vertices[None] + np.einsum("ne,evc->nvc", coeffs, tracking.expression_basis)
        gap = mesh[:, 14, 1] - mesh[:, 13, 1]  # lower minus upper inner lip, head y is down
        assert np.all(np.diff(gap) > 0) and gap[-1] - gap[0] > 0.08 * width


def test_segmenter_contract_and_portrait_mask(astronaut, tmp_path):
    from ophav_core.media import mask_overlay, save_png

    segmenter = MediapipeSegmenter(context=contracts.tiny_context())
    contracts.check_segmenter(segmenter)
    frames = FrameSet(astronaut[None])
    masks = contracts.check_segmenter(segmenter, frames)
    alpha = masks.alpha[0]
    assert alpha[150:170, 210:240].mean() > 0.9, "face centre kept"
    assert alpha[40:60, 200:260].mean() > 0.5, "hair kept"
    assert alpha[-60:, :60].mean() < 0.05 and alpha[-60:, -60:].mean() < 0.05, "clothes in the bottom corners dropped"
    assert alpha[330:400, 200:260].mean() < 0.1, "suit below the neck dropped"
    assert alpha[:60, :60].mean() < 0.05, "background dropped"
    png = save_png(tmp_path / "mask.png", mask_overlay(frames, masks))
    assert png.stat().st_size > 5000


@needs_data
def test_segmenter_video_is_temporally_stable(clip, clip_tracking):
    segmenter = MediapipeSegmenter(context=contracts.tiny_context())
    frames = FrameSet(clip.frames[:6], fps=clip.fps)
    tracking = clip_tracking[0].subset(np.arange(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = contracts.check_segmenter(segmenter, frames, tracking)
    # A talking head on a still background: masks barely change between frames.
    assert np.abs(np.diff(masks.alpha, axis=0)).mean() < 0.01
    assert masks.alpha[:, 200:260, 220:300].mean() > 0.9


def test_expression_smoothing_keeps_a_quick_small_mouth_movement():
    """A driver's mouth opening and closing three times a second by 0.3 units (a nodding, talking driver's size)
    keeps most of its amplitude through the tracker's expression filter; the old setting (beta 0.2) kept 23%."""
    t = np.arange(100) / 25.0
    movement = (0.3 * np.sin(2 * np.pi * 3.0 * t))[:, None]
    kept = MediapipeTracker()._filter(movement, 25.0, "expression")
    assert np.ptp(kept[20:80]) > 0.75 * np.ptp(movement[20:80])


def test_still_head_does_not_jitter(astronaut):
    rng = np.random.default_rng(0)
    noisy = astronaut[None].astype(np.int16) + rng.normal(0, 4, (12,) + astronaut.shape)
    frames = FrameSet(np.clip(noisy, 0, 255).astype(np.uint8), fps=25.0)
    raw = MediapipeTracker({"smooth": 0.0}).track(frames)
    smooth = MediapipeTracker().track(frames)
    yaw_raw, yaw = matrix_to_euler(raw.rotation)[0], matrix_to_euler(smooth.rotation)[0]
    assert np.ptp(yaw) < 0.5 and np.ptp(yaw) < 0.6 * np.ptp(yaw_raw)
    step = lambda t: np.linalg.norm(np.diff(t.project(t.vertices.astype(np.float64)), axis=0), axis=-1).mean()  # noqa: E731
    # The pose is smoothed hard (above); the expressions only lightly, so that a driver's small, quick mouth
    # movements are not smoothed away (tracker.py, _FILTERS). A quarter of a pixel a frame at 512 px is far below
    # what shows.
    assert step(smooth) < 0.25 and step(smooth) < step(raw), "projected mesh moves under 0.25 px a frame"


def test_stderr_comes_back_when_threads_silence_it_at_once():
    """Two threads (the tracker and the segmenter's mattes in ``ophav preprocess``) silencing MediaPipe's native
    log at overlapping times: file descriptor 2 is /dev/null while either is inside, and itself again after."""
    import os
    import threading

    from ophav_mediapipe.detect import native_stderr_silenced

    def target_of_fd2() -> str:
        return os.readlink("/proc/self/fd/2") if os.path.exists("/proc/self/fd/2") else ""

    before = target_of_fd2()
    first_in, second_in, first_may_leave = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with native_stderr_silenced():
            first_in.set()
            second_in.wait(5)
            first_may_leave.wait(5)
        seen["after first"] = target_of_fd2()

    def second():
        first_in.wait(5)
        with native_stderr_silenced():
            second_in.set()
            seen["inside"] = target_of_fd2()
            first_may_leave.set()
            threading.Event().wait(0.05)  # the first one leaves while this one is still inside
            seen["inside after first left"] = target_of_fd2()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["inside"] == os.devnull and seen["inside after first left"] == os.devnull
    assert target_of_fd2() == before


def _cut_below(cut: np.ndarray, column: int) -> int:
    """The first row of ``column`` where the neck cut has fallen below one half."""
    return int(np.argmax(cut[:, column] < 0.5))


def test_neck_cut_drops_beside_a_jaw_angle_only_where_it_is_the_outer_corner():
    from ophav_mediapipe.segmenter import neck_cut

    size, right, down, face_w, face_h = (100, 100), np.array([1.0, 0.0]), np.array([0.0, 1.0]), 40.0, 50.0
    theta = np.linspace(0.0, np.pi, 15)
    # A frontal lower jaw, a U from the angle at x=30 round the chin (y=70) to the angle at x=70.
    frontal = np.stack([50 - 20 * np.cos(theta), 50 + 20 * np.sin(theta)], 1)
    cut = neck_cut(frontal, size, right, down, face_w, face_h, neck_margin=0.1, side_drop=0.2)
    level = _cut_below(neck_cut(frontal, size, right, down, face_w, face_h, 0.1, side_drop=0.0), 20)
    assert _cut_below(cut, 20) > level + 5 and _cut_below(cut, 80) > level + 5, "ear lobes kept on both sides"
    # Turned: the far half of the jaw folds back behind the chin, so on that side the chin (x=22) lies beyond
    # the angle (x=35) and takes no drop; the near angle (x=75) is still the corner on its side.
    turned = frontal.copy()
    turned[:8, 0] = np.linspace(35, 22, 8)
    turned[8:, 0] = np.linspace(22, 75, 7)
    cut = neck_cut(turned, size, right, down, face_w, face_h, neck_margin=0.1, side_drop=0.2)
    flat = neck_cut(turned, size, right, down, face_w, face_h, neck_margin=0.1, side_drop=0.0)
    assert _cut_below(cut, 10) == _cut_below(flat, 10), "no drop below the chin of a turned face"
    assert _cut_below(cut, 90) > _cut_below(flat, 90) + 5
