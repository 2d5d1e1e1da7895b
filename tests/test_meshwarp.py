"""Image2Video ``meshwarp`` (plugins/ophav_meshwarp): the portrait re-posed by its tracked face mesh."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe")
pytest.importorskip("cv2")

from ophav_core.errors import UsageError  # noqa: E402
from ophav_core.stages import FrameSet, Portrait  # noqa: E402
from ophav_core.stages.motion import (Motion, default_script, matrix_to_euler, motion_from_script,  # noqa: E402
                               relative_motion_from_tracking)
from ophav_core.testing import contracts  # noqa: E402
from ophav_mediapipe.blendshapes import named_offsets  # noqa: E402
from ophav_mediapipe.mesh import SEMANTIC, load_canonical_mesh, topology  # noqa: E402
from ophav_mediapipe.tracker import MediapipeTracker  # noqa: E402
from ophav_meshwarp.crop import crop_box, crop_image  # noqa: E402
from ophav_meshwarp.field import ThinPlateField, border_points  # noqa: E402
from ophav_meshwarp.generator import MeshWarp  # noqa: E402
from ophav_meshwarp.topology import build_parts, contour_opening  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TALK = DATA / "driving" / "talk_78f.mp4"
SIZE = 128


def _motion(*rows: dict) -> Motion:
    get = lambda k: np.array([r.get(k, 0.0) for r in rows], np.float32)  # noqa: E731
    return Motion(10.0, get("yaw"), get("pitch"), get("roll"),
                  {k: get(k) for k in ("smile", "mouth_open", "blink", "brows_up")})


@pytest.fixture(scope="module")
def astronaut() -> Portrait:
    skimage_data = pytest.importorskip("skimage.data")
    return Portrait(skimage_data.astronaut(), "astronaut")


@pytest.fixture(scope="module")
def meshwarp() -> MeshWarp:
    return MeshWarp({"resolution": SIZE}, contracts.tiny_context())


@pytest.fixture(scope="module")
def tracker() -> MediapipeTracker:
    return MediapipeTracker(context=contracts.tiny_context())


@pytest.fixture(scope="module")
def poses(meshwarp, astronaut) -> FrameSet:
    """Neutral, yaw +30, mouth open, and neutral again, at 128x128."""
    return meshwarp.generate(astronaut, _motion({}, {"yaw": 30.0}, {"mouth_open": 1.0}, {}))


@pytest.fixture(scope="module")
def retracked(tracker, poses):
    # Each frame on its own (no temporal smoothing across these unrelated poses).
    return tracker.track(FrameSet(poses.frames, fps=poses.fps), single_image=True, source="meshwarp test")


# ---------------------------------------------------------------------------------------------- parts


def test_mesh_parts_on_the_canonical_mesh():
    vertices, faces, _ = load_canonical_mesh()
    parts = build_parts(topology())
    assert np.array_equal(parts.symmetry[parts.symmetry], np.arange(len(vertices))), "mirror map is not an involution"
    assert np.allclose(vertices[parts.symmetry] * [-1, 1, 1], vertices, atol=1e-3)
    # The mouth triangles tile the inner-lip polygon exactly (the canonical mouth is slightly open).
    p = vertices[:, :2].astype(np.float64)
    tri = p[faces[parts.mouth_faces]]
    area = 0.5 * np.abs(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])).sum()
    polygon = contour_opening(p, parts.lips_inner) * np.ptp(p[parts.lips_inner, 0])
    assert area == pytest.approx(polygon, rel=1e-4)
    assert (parts.eye_face_owner == 0).sum() > 0 and (parts.eye_face_owner == 1).sum() > 0
    assert set(np.unique(parts.mouth_uv[parts.lips_inner, 1])) == {0.0, 0.5, 1.0}


def test_thin_plate_field_matches_a_direct_solve_and_keeps_the_border_still():
    rng = np.random.default_rng(0)
    size, grid = 96, 32  # lattice nodes at pixels 3k + 1, where the resized field is exact
    still = np.concatenate([border_points(size), rng.uniform(0, size, (12, 2))])
    moving, shift = rng.uniform(30, 66, (20, 2)), rng.normal(0, 4, (20, 2))
    field = ThinPlateField(still, size, grid)(moving, shift)
    points = np.concatenate([moving, still]) / size
    n = len(points)
    r2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = r2 * np.log(np.maximum(r2, 1e-20)) + 1e-4 * np.eye(n)
    poly = np.concatenate([np.ones((n, 1)), points], 1)
    system[:n, n:], system[n:, :n] = poly, poly.T
    rhs = np.concatenate([shift, np.zeros((len(still) + 3, 2))])
    coeffs = np.linalg.solve(system, rhs)
    q = np.array([[40.0, 49.0]]) / size
    rq = ((q[:, None] - points[None]) ** 2).sum(-1)
    direct = rq * np.log(np.maximum(rq, 1e-20)) @ coeffs[:n] + np.concatenate([[[1.0]], q], 1) @ coeffs[n:]
    assert np.abs(field[49, 40] - direct[0]).max() < 1e-3
    assert np.abs(field[0]).max() < 0.05 * np.abs(shift).max() and np.abs(field[:, -1]).max() < 0.05 * np.abs(shift).max()


def test_crop_box_prefers_staying_inside_the_image():
    face = np.array([[300.0, 150.0], [400.0, 270.0]])  # a face near the right edge of a 700x464 photo
    box = crop_box(face, (700, 464), scale=2.2, shift_up=0.08, min_scale=1.6)
    side = box[2] - box[0]
    assert side == pytest.approx(264.0, abs=1e-6)  # 2.2 x 120 fits
    assert box[0] >= 0 and box[2] <= 700 and box[1] >= 0 and box[3] <= 464
    assert box[0] <= 300 and box[2] >= 400 and box[1] <= 150 and box[3] >= 270
    # A face filling the image: the crop shrinks to the image instead of padding.
    box = crop_box(np.array([[100.0, 100.0], [400.0, 420.0]]), (512, 512), 2.2, 0.08, min_scale=1.6)
    assert box[2] - box[0] == pytest.approx(512.0)
    # Without min_scale the box may leave the image: edges are replicated.
    image = np.zeros((40, 40, 3), np.uint8)
    image[:, :20] = 200
    out = crop_image(image, np.array([-20.0, 0.0, 20.0, 40.0]), 40)
    assert out.shape == (40, 40, 3) and out[:, :15].min() == 200


# ---------------------------------------------------------------------------------------------- component


def test_plugin_registers_meshwarp():
    from ophav_core.plugins import build_host

    spec = build_host().registry.get("image2video", "meshwarp")
    assert spec.missing_requirements() == []
    assert spec.extra == "meshwarp" and spec.component_class() is MeshWarp


def test_contract_on_a_real_portrait(meshwarp, astronaut):
    motion = motion_from_script(default_script(), fps=5, duration=2)
    frames = contracts.check_image2video(meshwarp, astronaut, motion)
    assert frames.size == (SIZE, SIZE)
    assert MeshWarp({"resolution": 96}, contracts.tiny_context()).resolution == 96
    assert MeshWarp(None, contracts.tiny_context("/tmp", profile="preview")).resolution == 128


def test_driving_parameters_are_saved_with_the_frames(poses, tmp_path):
    assert np.allclose(poses.driving["yaw"], [0, 30, 0, 0])
    assert np.allclose(poses.driving["expr_mouth_open"], [0, 0, 1, 0])
    assert poses.driving["crop_box"].shape == (4, 4)
    assert poses.driving["fill_mouth"][2] > 0 and poses.driving["fill_mouth"][0] == 0
    again = FrameSet.load(poses.save(tmp_path / "frames.npz"))
    assert set(again.driving) == set(poses.driving)
    assert np.array_equal(again.frames, poses.frames)


def test_neutral_frame_reproduces_the_crop(meshwarp, astronaut, poses):
    source, _ = meshwarp.prepare(astronaut)
    assert np.abs(poses.frames[0].astype(float) - source.image).mean() < 1.5
    assert np.array_equal(poses.frames[0], poses.frames[3])


def test_yaw_turns_the_face_the_right_way(poses, retracked):
    assert np.abs(poses.frames[1].astype(float) - poses.frames[0]).mean() > 5
    yaw = matrix_to_euler(retracked.rotation)[0]
    assert yaw[1] - yaw[0] > 15, f"re-estimated yaw went from {yaw[0]:.1f} to {yaw[1]:.1f} for a +30 degree turn"
    nose = retracked.landmarks[:, SEMANTIC["nose"][0], 0]
    width = np.ptp(retracked.landmarks[0, :, 0])
    assert nose[1] - nose[0] > 0.05 * width, "positive yaw must move the nose towards image right"


def test_mouth_open_opens_the_retracked_mouth(retracked):
    gap = np.linalg.norm(retracked.landmarks[:, 13] - retracked.landmarks[:, 14], axis=1)
    width = np.ptp(retracked.landmarks[0, :, 0])
    assert gap[2] - gap[0] > 0.05 * width, f"inner-lip gap {gap[0]:.1f} -> {gap[2]:.1f} px"


def test_background_far_from_the_head_stays_still(poses):
    corner = SIZE // 10
    for frame in poses.frames[1:3]:
        for rows, cols in ((slice(0, corner), slice(0, corner)), (slice(0, corner), slice(-corner, None)),
                           (slice(-corner, None), slice(0, corner)), (slice(-corner, None), slice(-corner, None))):
            diff = np.abs(frame[rows, cols].astype(float) - poses.frames[0][rows, cols]).mean()
            assert diff < 3.0, f"a corner moved by {diff:.1f} grey levels"


def test_mouth_fill_paints_a_cavity_not_stretched_lips(astronaut):
    motion = _motion({}, {"mouth_open": 1.0})
    filled = MeshWarp({"resolution": SIZE}, contracts.tiny_context()).generate(astronaut, motion)
    plain = MeshWarp({"resolution": SIZE, "mouth_fill": False}, contracts.tiny_context()).generate(astronaut, motion)
    assert np.array_equal(filled.frames[0], plain.frames[0])
    changed = np.abs(filled.frames[1].astype(float) - plain.frames[1]).sum(-1) > 30
    assert changed.sum() > 20, "the mouth fill changed nothing"
    assert filled.frames[1][changed].mean() < plain.frames[1][changed].mean(), "the cavity must be darker"


def test_dense_offsets_drive_like_named_expressions(meshwarp, astronaut):
    vertices = load_canonical_mesh()[0]
    width = np.ptp(vertices[:, 0])
    offsets = np.zeros((2, 468, 3), np.float32)
    offsets[1] = named_offsets()["smile"] / width
    zeros = np.zeros(2, np.float32)
    dense = meshwarp.generate(astronaut, Motion(10.0, zeros, zeros, zeros, {}, offsets, "mediapipe468"))
    named = meshwarp.generate(astronaut, _motion({}, {"smile": 1.0}))
    assert np.abs(dense.frames[1].astype(float) - named.frames[1]).mean() < 0.5
    assert np.abs(dense.frames[1].astype(float) - dense.frames[0]).mean() > 0.3
    with pytest.raises(UsageError, match="topology"):
        meshwarp.generate(astronaut, Motion(10.0, zeros, zeros, zeros, {}, offsets, "flame"))


# ---------------------------------------------------------------------------------------------- slow, data


@pytest.mark.slow
def test_default_script_is_tracked_turning_and_keeps_identity(astronaut, tracker):
    """The issue's acceptance numbers on the astronaut at the default 512 px and 25 fps (benchmarks/bench_meshwarp.py
    runs them on every portrait of ../shared/data). MediaPipe reads a warped turn as ~75% of its true angle
    (mostly from the face's own texture, see the report), so the +-52 degree script re-tracks at about 80."""
    mw = MeshWarp({"resolution": 512}, contracts.tiny_context())
    video = mw.generate(astronaut, motion_from_script(default_script(), fps=25, duration=12))
    tracking = tracker.track(video, source="meshwarp default script")
    assert tracking.valid.mean() >= 0.98
    yaw = matrix_to_euler(tracking.rotation)[0]
    assert np.ptp(yaw) >= 60, f"re-estimated yaw spans only {np.ptp(yaw):.1f} degrees"
    shape = mw.prepare(astronaut)[0].local
    motion = np.max([np.linalg.norm(v, axis=1) for v in named_offsets().values()], axis=0)
    keep = motion < 0.05  # vertices no named expression moves: identity, whatever the expression
    assert _similarity_rms(tracking.canonical_vertices.astype(np.float64)[keep], shape[keep]) < 0.03


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not TALK.exists(), reason=f"shared test data not found at {DATA}")
def test_driving_video_mouth_follows_the_driver(astronaut, tracker):
    from ophav_core.media import read_video

    driver = read_video(TALK, size=256)
    driver_tracking = tracker.track(driver, source=str(TALK))
    motion = relative_motion_from_tracking(driver_tracking, driver.fps, driver)
    video = MeshWarp({"resolution": 256}, contracts.tiny_context()).generate(astronaut, motion)
    tracking = tracker.track(video, source="meshwarp driven")

    def opening(t):
        local = np.einsum("nji,nvj->nvi", t.rotation, t.vertices - t.translation[:, None])
        return np.linalg.norm(local[:, 13] - local[:, 14], axis=1)

    corr = np.corrcoef(opening(driver_tracking), opening(tracking))[0, 1]
    assert corr > 0.8, f"mouth opening correlation {corr:.3f}"


def _similarity_rms(a: np.ndarray, b: np.ndarray) -> float:
    ca, cb = a - a.mean(0), b - b.mean(0)
    u, s, vt = np.linalg.svd(ca.T @ cb)
    fix = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    scale = (s * np.diag(fix)).sum() / (ca ** 2).sum()
    aligned = scale * ca @ (u @ fix @ vt)
    return float(np.sqrt(((aligned - cb) ** 2).sum(1).mean()) / np.ptp(b[:, 0]))


def test_the_drawn_mesh_corrects_the_retracked_pose(meshwarp, tracker, astronaut):
    """meshwarp gives the mesh it drew each frame with; the tracking posed onto it projects closer to it than
    the tracker's own estimate, and strongly turned frames turn by what was asked of them (MediaPipe reads
    them as less turned)."""
    from ophav_core.stages.image2video import GENERATED_CAMERA, GENERATED_VERTICES

    asked = np.array([0.0, 45.0, -45.0, 55.0])
    frames = meshwarp.generate(astronaut, _motion(*({"yaw": y} for y in asked)))
    retracked = tracker.track(FrameSet(frames.frames, fps=frames.fps), single_image=True, source="meshwarp test")
    drawn, camera = frames.driving[GENERATED_VERTICES], frames.driving[GENERATED_CAMERA]
    assert drawn.shape == retracked.vertices.shape and camera.shape == (len(frames), 3, 3)
    posed = retracked.posed_onto(drawn, camera)
    goal = retracked.project(drawn, camera[0])
    error = lambda t: np.linalg.norm(t.project(t.vertices) - goal, axis=-1).mean()  # noqa: E731
    assert error(posed) < 0.8 * error(retracked), (error(posed), error(retracked))
    turn = lambda t: matrix_to_euler(t.rotation)[0] - matrix_to_euler(t.rotation)[0][0]  # noqa: E731
    assert np.abs(turn(posed) - asked).max() < 4.0, f"posed yaw turned by {turn(posed).round(1)} for {asked}"
    assert np.abs(turn(posed) - asked).mean() < np.abs(turn(retracked) - asked).mean()


def test_smooth_continuation_reaches_far_from_what_was_seen():
    from ophav_meshwarp.warper import smooth_continuation

    image = np.zeros((64, 64, 3), np.float32)
    image[:, :6] = [200.0, 150.0, 120.0]  # skin seen in a narrow band; the rest is unseen (black underneath)
    seen = np.zeros((64, 64), np.float32)
    seen[:, :6] = 1.0
    rows, cols = np.nonzero(np.ones((64, 64), bool))
    continued = smooth_continuation(image, seen, rows, cols, blur=2.0)
    # A single normalised convolution at this width gives a ratio of two vanishing sums far from the band: dark.
    assert np.abs(continued - [200.0, 150.0, 120.0]).max() < 1.0


PORTRAIT_JT = DATA / "portraits" / "Justin_Timberlake_crop.png"


@pytest.mark.skipif(not PORTRAIT_JT.exists(), reason=f"shared test data not found at {DATA}")
def test_a_strongly_turned_cheek_is_filled_with_skin_not_black():
    from ophav_core.media import read_image
    from ophav_core.media.raster import rasterise
    from ophav_core.stages.motion import euler_to_matrix
    from ophav_meshwarp.warper import render_frame

    warp = MeshWarp({"resolution": SIZE}, contracts.tiny_context())
    source, _ = warp.prepare(Portrait(read_image(PORTRAIT_JT).image, "Justin_Timberlake_crop"))
    frame, info = render_frame(source, euler_to_matrix(np.array([-52.0]), np.zeros(1), np.zeros(1))[0])
    ids = rasterise(info.points2d.astype(np.float64), info.vertices[:, 2].astype(np.float64), source.parts.faces,
                    (SIZE, SIZE)).ids
    dark = (frame[ids >= 0].max(axis=-1) < 45).mean()
    # The baby's face is light skin; before the multi-scale continuation 2.8% of it was a black crescent.
    assert dark < 0.01, f"{dark:.1%} of the turned face is near black"


def test_frames_drawn_by_several_threads_equal_one_threads(meshwarp, astronaut):
    from ophav_meshwarp.parallel import draw_frames, worker_count

    source, _ = meshwarp.prepare(astronaut)
    rotations = _motion({}, {"yaw": 20.0}, {"pitch": -10.0}, {"yaw": -35.0}, {"roll": 8.0}).rotations()
    offsets = [None] * len(rotations)
    one = [frame for frame, _ in draw_frames(source, rotations.astype(np.float64), offsets, 1)]
    several = [frame for frame, _ in draw_frames(source, rotations.astype(np.float64), offsets, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(one, several)) and len(several) == len(rotations)
    assert not np.array_equal(one[0], one[1])
    assert worker_count(4, None) == 1 and worker_count(100, 3) == 3 and worker_count(2, 8) == 2
