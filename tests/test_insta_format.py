"""INSTA's dataset format in and out (ophav_core/media/insta_format.py): an ophav dataset survives the round trip
through it, a synthetic INSTA-format folder written here by metrical-tracker's conventions trains with
``ophav fit`` and renders its held-out views back, and a malformed folder gets one line naming the problem."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ophav_core.cli import main
from ophav_core.media import insta_format
from ophav_core.media.raster import rasterise
from ophav_core.testing.synthetic import ellipsoid_mesh, render_synthetic, synthetic_tracking

# ---------------------------------------------------------------------------------------------- helpers


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _project(tracking, vertices):
    return tracking.project(vertices.astype(np.float64), tracking.K)


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_keeps_frames_masks_meshes_and_cameras(tmp_path):
    tracking = synthetic_tracking(12, 48, num_expressions=4, seed=3)
    frames, masks = render_synthetic(tracking)
    masks.alpha[:, ::5] *= 0.5  # a soft matte too, not only 0 and 1
    insta_format.write_insta(tmp_path / "insta", frames, masks, tracking, test_frames=3)
    for name in ("transforms_train.json", "transforms_val.json", "transforms_test.json", "canonical.obj",
                 "images/00000.png", "matted/00011.png", "meshes/00011.obj", "flame/exp/00011.txt"):
        assert (tmp_path / "insta" / name).is_file(), name

    data = insta_format.read_insta(tmp_path / "insta")
    back = data.tracking
    assert np.array_equal(data.frames.frames, frames.frames)
    assert np.abs(data.masks.alpha - masks.alpha).max() <= 0.5 / 255 + 1e-6  # 8-bit alpha
    scale = np.abs(tracking.vertices).max()
    assert np.abs(back.vertices - tracking.vertices).max() < 1e-5 * scale
    pixels = np.abs(_project(back, back.vertices) - _project(tracking, tracking.vertices)).max()
    assert pixels < 1e-4, pixels
    assert np.allclose(back.K, tracking.K) and tuple(back.image_size) == tuple(tracking.image_size)
    assert np.allclose(back.rotation, tracking.rotation, atol=1e-6)
    assert np.allclose(back.translation, tracking.translation, atol=1e-5)
    assert np.allclose(back.expression, tracking.expression, atol=1e-6)
    assert np.array_equal(back.expression_basis, tracking.expression_basis)
    assert np.array_equal(back.faces, tracking.faces) and back.mesh_type == tracking.mesh_type
    assert set(back.semantic) == set(tracking.semantic)
    assert np.allclose(back.landmarks, tracking.landmarks)
    # INSTA's split: test = the last frames, val = the last min(20, test) of them, train = the rest.
    assert data.splits["train"].tolist() == list(range(9))
    assert data.splits["test"].tolist() == [9, 10, 11] and data.splits["val"].tolist() == [9, 10, 11]
    assert data.held_out.tolist() == [9, 10, 11]
    # Reading one split decodes its frames only; the tracking is the same (basis fitted over every split).
    train = insta_format.read_insta(tmp_path / "insta", split="train")
    assert np.array_equal(train.frames.frames, frames.frames[:9]) and len(train.tracking) == 9
    assert np.array_equal(train.tracking.vertices, back.vertices[:9])
    assert np.array_equal(train.tracking.expression_basis, back.expression_basis)


def test_foreign_meshes_give_the_same_geometry_without_ophavs_sidecar(tmp_path):
    """Without ophav's sidecar (a folder from metrical-tracker), the expression basis is fitted to the meshes:
    the frames' meshes come back from canonical + basis . expression, and the camera still projects exactly."""
    tracking = synthetic_tracking(10, 48, num_expressions=3, seed=1)
    frames, masks = render_synthetic(tracking)
    insta_format.write_insta(tmp_path / "insta", frames, masks, tracking)
    shutil.rmtree(tmp_path / "insta" / "ophav")
    back = insta_format.read_insta(tmp_path / "insta").tracking
    assert back.mesh_type == f"obj{tracking.canonical_vertices.shape[0]}"
    assert np.allclose(back.canonical_vertices, tracking.canonical_vertices, atol=1e-4)  # from canonical.obj
    rebuilt = back.mesh_for(back.rotation, back.translation, back.expression)
    assert np.abs(rebuilt - tracking.vertices).max() < 1e-4
    assert np.abs(_project(back, back.vertices) - _project(tracking, tracking.vertices)).max() < 1e-4
    assert back.num_expressions == 3  # the three linear coefficients explain everything: no residual component


def test_preprocess_format_insta_matches_the_ophav_dataset(tmp_path, fakes_env, capsys):
    """`ophav preprocess --format insta` then reading the folder gives what `ophav preprocess` stores."""
    from ophav_core import api
    from ophav_core.media import save_png

    source = tmp_path / "video"
    rng = np.random.default_rng(0)
    for i in range(6):
        save_png(source / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    common = ["preprocess", str(source), "--tracker", "fake", "--segmenter", "fake", "--size", "32", "-q"]
    assert run_cli([*common, "--out", str(tmp_path / "own")], capsys)[0] == 0
    assert run_cli([*common, "--out", str(tmp_path / "insta"), "--format", "insta", "--test-frames", "2"],
                   capsys)[0] == 0
    assert insta_format.is_insta_dataset(tmp_path / "insta") and not (tmp_path / "insta" / "dataset.json").exists()
    own_frames, own_masks, own_tracking, _ = api.load_dataset(tmp_path / "own")
    data = insta_format.read_insta(tmp_path / "insta")
    assert np.array_equal(data.frames.frames, own_frames.frames)
    assert np.array_equal(data.masks.alpha, own_masks.alpha)
    assert np.abs(data.tracking.vertices - own_tracking.vertices).max() < 1e-4
    frames, _, tracking, meta = api.load_dataset(tmp_path / "insta")  # fit's view: the train split
    assert len(frames) == 4 and np.array_equal(frames.frames, own_frames.frames[:4])
    assert meta["tracker"]["name"] == "fake" and meta["kind"] == "insta"


# ---------------------------------------------------------------------------------------------- synthetic INSTA data

SIZE, FOCAL, DISTANCE = 40, 80.0, 0.6
TRAIN_YAWS, HELD_OUT_YAWS = tuple(np.linspace(-30, 30, 10)), (-12.0, 9.0)
# The insta field at test size: ~30 ms per iteration on one core (the sizes of tests/test_insta.py).
FIELD = dict(log2_table=14, levels=8, finest_resolution=256, hidden_dim=32, batch_rays=256, samples_per_ray=24,
             frames_per_batch=4, candidate_grid=8, candidates=4, occupancy_resolution=16, occupancy_warmup=60)
ITERATIONS = 150
# Measured 2026-12-01 on the 2-core machine, 150 iterations: held-out views 20.9 and 21.3 dB, training views
# 19.2-21.7 dB (100 iterations reach only 16.7 and 17.3). An avatar that renders nothing (white) scores 12.3 and
# 12.7 dB on the held-out views, and that is what the same data gives when its cameras are in the OpenGL/NeRF axes
# (the head lies behind every camera, nothing is learnt: 12.3 and 12.8 dB, measured). 17 dB sits 4 dB below the
# first and 4 dB above the second.
PSNR_THRESHOLD = 17.0


def _rot_y(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def _camera_to_world(yaw: float, opengl: bool = False) -> np.ndarray:
    """metrical-tracker's camera DISTANCE metres in front of the face (+z in FLAME's world), turned by ``yaw``
    about the world's up axis: camera-to-world in OpenCV axes (columns right, down, forward), as INSTA stores it;
    ``opengl`` gives the same camera in NeRF's axes (up, backward), the convention INSTA does *not* use."""
    c2w = np.eye(4)
    c2w[:3, :3] = np.diag([1.0, -1.0, -1.0])
    c2w[:3, 3] = [0.0, 0.0, DISTANCE]
    turn = np.eye(4)
    turn[:3, :3] = _rot_y(yaw)
    c2w = turn @ c2w
    if opengl:
        c2w[:3, 1:3] *= -1
    return c2w


def _obj(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    lines = [f"v {x:.8f} {y:.8f} {z:.8f}" for x, y, z in vertices] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")


def write_synthetic_insta(folder: Path, opengl: bool = False, seed: int = 0) -> list[dict]:
    """An INSTA-format folder of a known head (an ellipsoid in FLAME's world: metres, y up, face towards +z, with
    two linear expressions) seen by known cameras, rendered with ophav's rasteriser (vertex colours, a binary
    matte in the alpha channel). Written here from the format's conventions, not with ophav's writer."""
    from PIL import Image

    verts, faces = ellipsoid_mesh()
    world = np.stack([verts[:, 0], -verts[:, 1], -verts[:, 2]], axis=1) / 100.0  # cm, y down -> m, y up
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(2, len(world), 3)) * 0.002
    basis[:, world[:, 2] < 0] = 0.0  # only the face moves
    colours = np.clip(128 + 900 * world, 0, 255)
    for sub in ("images", "meshes", "flame/exp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    _obj(folder / "canonical.obj", world, faces)
    records, truth = [], []
    for i, yaw in enumerate(TRAIN_YAWS + HELD_OUT_YAWS):
        exp = rng.uniform(-1, 1, size=2)
        mesh = world + np.einsum("e,evc->vc", exp, basis)
        c2w = _camera_to_world(yaw)
        w2c = np.linalg.inv(c2w)
        cam = mesh @ w2c[:3, :3].T + w2c[:3, 3]
        # INSTA's cx, cy = w/2 (pixel i spans [i, i+1]); the rasteriser centres pixel i at i: subtract a half.
        uv = FOCAL * cam[:, :2] / cam[:, 2:] + SIZE / 2 - 0.5
        raster = rasterise(uv, cam[:, 2], faces, (SIZE, SIZE))
        rgb = np.full((SIZE, SIZE, 3), 90.0)
        rgb[raster.ys, raster.xs] = raster.interpolate(colours)
        rgba = np.concatenate([np.clip(np.rint(rgb), 0, 255), raster.mask[..., None] * 255.0], axis=2)
        name = f"{i:05d}"
        Image.fromarray(rgba.astype(np.uint8)).save(folder / "images" / f"{name}.png")
        _obj(folder / "meshes" / f"{name}.obj", mesh, faces)
        np.savetxt(folder / "flame" / "exp" / f"{name}.txt", exp, fmt="%.8f")
        records.append({"file_path": f"images/{name}.png", "mesh_path": f"meshes/{name}.obj",
                        "exp_path": f"flame/exp/{name}.txt",
                        "transform_matrix": _camera_to_world(yaw, opengl).tolist()})
        truth.append({"uv": uv, "rgba": rgba})
    head = {"w": SIZE, "h": SIZE, "fl_x": FOCAL, "fl_y": FOCAL, "cx": SIZE / 2, "cy": SIZE / 2}
    n = len(TRAIN_YAWS)
    for split, part in (("train", records[:n]), ("val", records[n:]), ("test", records[n:])):
        (folder / f"transforms_{split}.json").write_text(json.dumps({**head, "frames": part}, indent=1))
    return truth


def test_reader_puts_the_known_mesh_on_the_known_pixels(tmp_path):
    truth = write_synthetic_insta(tmp_path / "data")
    data = insta_format.read_insta(tmp_path / "data")
    assert data.tracking.mesh_type.startswith("obj") and data.held_out.tolist() == [10, 11]
    for i, known in enumerate(truth):
        assert np.abs(_project(data.tracking, data.tracking.vertices[i]) - known["uv"]).max() < 1e-3
        assert np.array_equal(data.masks.alpha[i] * 255, known["rgba"][..., 3])
    # Head space is ophav's (y down, z back, cm): the top of the head has the smallest y, the face the smallest z.
    canonical = data.tracking.canonical_vertices
    assert canonical[:, 1].argmin() == 0 and np.ptp(canonical[:, 1]) == pytest.approx(20.0, rel=1e-3)


def _load_avatar(tmp_path: Path, with_field: bool = False):
    from ophav_core import api

    field, _ = api.create("field", "insta", api.context(tmp_path / "work", "tiny", "cpu", True),
                          [f"field.{k}={v}" for k, v in FIELD.items()])
    avatar = field.load(tmp_path / "avatar.ckpt")
    return (field, avatar) if with_field else avatar


def _fit_and_score(folder: Path, tmp_path: Path, capsys) -> np.ndarray:
    """`ophav fit` on the folder, then PSNR of each held-out view rendered back (white background)."""
    import torch

    from ophav_core.stages import RenderRequest

    sets = [item for key, value in FIELD.items() for item in ("--set", f"field.{key}={value}")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = run_cli(["fit", str(folder), "--out", str(tmp_path / "avatar.ckpt"), "--profile", "tiny",
                             "--field", "insta", "--iterations", str(ITERATIONS), "--device", "cpu", "-q", *sets],
                            capsys)
        assert code == 0, err
        field, avatar = _load_avatar(tmp_path, with_field=True)
        frames, masks, tracking = insta_format.read_insta(folder).split("held_out")
        out = field.render(avatar, RenderRequest.from_tracking(tracking))
    finally:
        torch.set_num_threads(threads)
    alpha = masks.alpha[..., None]
    target = frames.frames / 255.0 * alpha + (1 - alpha)
    mse = ((out.rgb / 255.0 - target) ** 2).mean(axis=(1, 2, 3))
    return -10 * np.log10(mse)


def test_fit_on_synthetic_insta_data_renders_the_held_out_views(tmp_path, capsys):
    pytest.importorskip("torch")
    write_synthetic_insta(tmp_path / "data")
    psnr = _fit_and_score(tmp_path / "data", tmp_path, capsys)
    assert (psnr > PSNR_THRESHOLD).all(), psnr
    # `ophav eval --dataset` on INSTA data scores the held-out frames (val and test) in the dataset's own tracking,
    # which shares the avatar's canonical mesh and expression basis (fitted once over every split).
    from ophav_core.study.evaluation import load_reference, same_basis

    frames, masks, tracking, meta = load_reference(tmp_path / "data")
    assert len(frames) == 2 and meta["split"] == "held_out"
    template = _load_avatar(tmp_path).template
    assert same_basis(tracking, template)


def test_cameras_read_in_the_wrong_axes_fail_the_threshold(tmp_path, capsys):
    """The same data with its cameras in OpenGL axes: the threshold above tells the conventions apart."""
    pytest.importorskip("torch")
    write_synthetic_insta(tmp_path / "data", opengl=True)
    psnr = _fit_and_score(tmp_path / "data", tmp_path, capsys)
    assert (psnr < PSNR_THRESHOLD).all(), psnr


# ---------------------------------------------------------------------------------------------- malformed folders


def _broken(tmp_path: Path, how: str) -> Path:
    folder = tmp_path / how
    tracking = synthetic_tracking(6, 32)
    frames, masks = render_synthetic(tracking)
    insta_format.write_insta(folder, frames, masks, tracking)
    if how == "missing split":
        (folder / "transforms_val.json").unlink()
    elif how == "mesh mismatch":
        verts, faces = insta_format.read_obj(folder / "meshes" / "00003.obj")
        kept = faces[faces.max(axis=1) < len(verts) - 2]
        (folder / "meshes" / "00003.obj").write_text(insta_format.obj_text(verts[:-2], kept))
    elif how == "frame without mesh":
        (folder / "meshes" / "00004.obj").unlink()
    elif how == "frame without image":
        (folder / "images" / "00002.png").unlink()
    elif how == "frame without matte":
        from PIL import Image

        Image.open(folder / "images" / "00001.png").convert("RGB").save(folder / "images" / "00001.png")
        shutil.rmtree(folder / "matted")
    return folder


@pytest.mark.parametrize("how, words", [
    ("missing split", ("transforms_val.json is missing",)),
    ("mesh mismatch", ("00003.obj", "mesh mismatch", "vertices")),
    ("frame without mesh", ("meshes/00004.obj", "does not exist")),
    ("frame without image", ("images/00002.png", "does not exist", "without an image")),
    ("frame without matte", ("00001.png", "no matte",)),
])
def test_malformed_folder_gives_one_line(tmp_path, capsys, how, words):
    folder = _broken(tmp_path, how)
    code, err = run_cli(["fit", str(folder), "--out", str(tmp_path / "a.ckpt"), "--field", "insta", "--device", "cpu"],
                        capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "a.ckpt").exists()
