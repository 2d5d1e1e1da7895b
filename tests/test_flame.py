"""The FLAME tracker with a synthetic model in FLAME's exact public layout (FLAME itself cannot be shipped):
the restricted unpickler, the weight-store entry, the FLAME layer, the derived landmark embedding, the batched
fit recovering known parameters, readiness, and a tiny run end to end."""
from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mediapipe")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def synthetic():
    from ophav_flame.synthetic import build_from_topology
    from ophav_mediapipe.mesh import topology

    return build_from_topology(topology())


@pytest.fixture(scope="module")
def model_file(synthetic, tmp_path_factory):
    from ophav_flame.synthetic import write_pickle

    return write_pickle(synthetic, tmp_path_factory.mktemp("flame") / "generic_model.pkl")


@pytest.fixture(scope="module")
def model(model_file):
    from ophav_flame.model import load_model

    return load_model(model_file)


@pytest.fixture(scope="module")
def embedding(model):
    from ophav_flame.embedding import derive
    from ophav_mediapipe.mesh import topology

    return derive(model, topology().template)


@pytest.fixture
def store(monkeypatch, tmp_path):
    from ophav_core import plugins

    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("OPHAV_TEST_FAKES", raising=False)
    plugins.reset_host()
    yield tmp_path / "weights"
    plugins.reset_host()


# ---------------------------------------------------------------------------------------------- the pickle


def test_the_synthetic_pickle_names_chumpy_and_scipy_and_loads_back(model_file, synthetic, model):
    from ophav_core.weights import pickled_globals

    names = pickled_globals(model_file)
    assert "chumpy.ch.Ch" in names and any(n.startswith("scipy.sparse") and n.endswith("csc_matrix") for n in names)
    assert model.v_template.shape == (5023, 3) and model.faces.shape == (9976, 3)
    assert model.shapedirs.shape == (5023, 3, 300) and model.exprdirs.shape == (5023, 3, 100)
    assert model.posedirs.shape == (5023, 3, 36) and model.J_regressor.shape == (5, 5023)
    assert model.weights.shape == (5023, 5) and model.parents == (-1, 0, 1, 1, 1)
    np.testing.assert_array_equal(model.v_template, synthetic["v_template"])
    np.testing.assert_array_equal(model.J_regressor, synthetic["J_regressor"])
    np.testing.assert_array_equal(model.exprdirs, synthetic["shapedirs"][:, :, 300:])


def _dump_with_fake_modules(obj_factory, path):
    """Pickle an object built by ``obj_factory(modules)`` while fake modules stand for chumpy."""
    ch, reordering = types.ModuleType("chumpy.ch"), types.ModuleType("chumpy.reordering")

    class Ch:
        def __init__(self, x):
            self.__dict__.update({"x": np.asarray(x), "_dirty_vars": set()})

    class Select:
        def __init__(self, a, idxs, preferred_shape):
            self.__dict__.update({"a": a, "idxs": idxs, "preferred_shape": preferred_shape})

    class transpose:  # noqa: N801 - chumpy's name
        def __init__(self, a, axes):
            self.__dict__.update({"a": a, "axes": axes})

    for cls, module in ((Ch, ch), (Select, reordering), (transpose, reordering)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch", "chumpy.reordering")}
    sys.modules.update({"chumpy": types.ModuleType("chumpy"), "chumpy.ch": ch, "chumpy.reordering": reordering})
    try:
        path.write_bytes(pickle.dumps(obj_factory(Ch, Select, transpose), protocol=2))
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)
    return path


def test_chumpy_reordering_nodes_evaluate_to_arrays(tmp_path):
    from ophav_flame.unpickle import load_pickle

    a = np.arange(24.0).reshape(2, 3, 4)
    path = _dump_with_fake_modules(lambda Ch, Select, transpose: {
        "plain": Ch(a), "picked": Select(Ch(a), np.array([1, 5, 7, 11]), (2, 2)),
        "swapped": transpose(Ch(a), (2, 0, 1)), "name": "lbs"}, tmp_path / "nodes.pkl")
    out = load_pickle(path)
    np.testing.assert_array_equal(out["plain"], a)
    np.testing.assert_array_equal(out["picked"], a.ravel()[[1, 5, 7, 11]].reshape(2, 2))
    np.testing.assert_array_equal(out["swapped"], np.transpose(a, (2, 0, 1)))
    assert out["name"] == "lbs"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "numpy subclass"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(payload, tmp_path):
    from ophav_flame.unpickle import FlamePickleError, load_pickle

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    if payload == "os.system":
        data = pickle.dumps({"v_template": _RunsCode(marker)}, protocol=2)
    elif payload == "builtins.eval":
        data = pickle.dumps({"f": _Eval(f"open({str(marker)!r}, 'w')")}, protocol=2)
    else:
        data = pickle.dumps({"f": np.zeros(3).view(np.matrix)}, protocol=2)
    path.write_bytes(data)
    with pytest.raises(FlamePickleError) as info:
        load_pickle(path)
    assert str(path) in str(info.value) or "refused" in str(info.value)
    assert not marker.exists()


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def test_weights_add_verifies_the_structure(store, model_file, tmp_path):
    from ophav_core import weights
    from ophav_core.errors import UsageError
    from ophav_flame.weights import FLAME_2020

    stored = weights.add(FLAME_2020, model_file)
    assert stored == store / "generic_model.pkl" and stored.is_file()
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"v_template": np.zeros((10, 3)), "f": np.zeros((4, 3), np.int64)}, protocol=2))
    with pytest.raises(UsageError, match=r"v_template is 10x3, expected 5023x3.*no 'shapedirs'"):
        weights.add(FLAME_2020, wrong)


def test_not_ready_without_a_model_names_the_file_and_its_source(store, model_file, capsys, monkeypatch):
    import shutil

    from ophav_core.cli import main

    from ophav_core import plugins
    from ophav_core.cli.run import plugin_rows

    row = next(r for r in plugin_rows()[0] if r["stage"] == "tracker" and r["name"] == "flame")
    assert not row["ready"] and row["weights"] == {"flame-2020": "missing"}
    assert "generic_model.pkl" in row["summary"] and "https://flame.is.tue.mpg.de" in row["summary"]
    assert "ophav weights add flame-2020" in row["summary"]
    monkeypatch.setenv("COLUMNS", "400")  # rich cuts cells to the terminal's width
    with pytest.raises(SystemExit):
        main(["plugins"])
    line = next(x for x in capsys.readouterr().out.splitlines() if " flame " in x)
    assert "weights: flame-2020 (missing: generic_model.pkl from https://flame.is.tue.mpg.de" in line, line
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, store / "flame2023_Open.pkl")  # any one of the three files makes it ready
    plugins.reset_host()
    row = next(r for r in plugin_rows()[0] if r["stage"] == "tracker" and r["name"] == "flame")
    assert row["ready"] and row["weights"] == {"flame-2023-open": "present"}


# ---------------------------------------------------------------------------------------------- the layer


def test_layer_zero_parameters_give_the_template_and_the_jaw_moves_only_jaw_vertices(model):
    from ophav_flame.layer import FlameLayer

    layer = FlameLayer(model, 50, 20, dtype=torch.float64)
    rest = layer(pose=torch.zeros(1, 15, dtype=torch.float64))[0].numpy()
    np.testing.assert_allclose(rest, model.v_template, atol=1e-12)
    pose = torch.zeros(1, 15, dtype=torch.float64)
    pose[0, 6] = 0.3  # jaw opens (about x)
    moved = np.linalg.norm(layer(pose=pose)[0].numpy() - model.v_template, axis=1)
    jaw = model.weights[:, 2] > 0
    assert moved[~jaw].max() < 1e-12
    assert moved[model.weights[:, 2] > 0.9].min() > 1e-3  # metres: the chin moves
    # Batched, with a subset of vertices and with barycentric points.
    shape = torch.randn(3, 50, dtype=torch.float64)
    full = layer(shape=shape, pose=pose.expand(3, -1))
    some = layer(shape=shape, pose=pose.expand(3, -1), vertices=torch.tensor([0, 17, 4000]))
    torch.testing.assert_close(some, full[:, [0, 17, 4000]])


def test_the_derived_embedding_finds_the_canonical_face(model, embedding):
    from ophav_flame.synthetic import FACE_SCALE

    r = embedding.residual_mm
    assert r.mean() < 1.5 and np.median(r) < 1.0 and np.percentile(r, 95) < 4.0, embedding.summary()
    assert abs(embedding.scale - FACE_SCALE) < 0.01 and np.allclose(embedding.rotation, np.eye(3), atol=0.01)


# ---------------------------------------------------------------------------------------------- the fit


def test_the_fit_recovers_known_shape_expression_pose_and_camera(model, embedding):
    """Landmarks projected from known parameters are fitted back: the stated bounds are the test."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.spatial.transform import Rotation

    from ophav_flame import fitting
    from ophav_flame.layer import FlameLayer

    torch.set_num_threads(1)
    S, E, N = 50, 30, 16
    layer = FlameLayer(model, S, E)
    rng = np.random.default_rng(3)
    beta = rng.normal(0, 0.8, S)
    psi = gaussian_filter1d(rng.normal(0, 1, (N, E)), 2, axis=0) * 1.5
    k = np.arange(N)
    jaw = np.zeros((N, 3))
    jaw[:, 0] = 0.2 * np.abs(np.sin(k / 4))
    neck = np.zeros((N, 3))
    rotvec = np.stack([0.25 * np.sin(k / 5), 0.4 * np.sin(k / 7), 0.1 * np.sin(k / 9)], 1)
    R = Rotation.from_rotvec(rotvec).as_matrix()
    t = np.stack([np.sin(k / 6), np.cos(k / 6), 60 + 2 * np.sin(k / 8)], 1)
    K = np.array([[768.0, 0, 255.5], [0, 768.0, 255.5], [0, 0, 1]])
    meshes = fitting.full_mesh(layer, beta, psi, jaw, neck)
    cam = np.einsum("nij,nvj->nvi", R, meshes) + t[:, None]
    points = (cam[:, model.faces[embedding.triangles]] * embedding.bary[None, :, :, None]).sum(2)
    observed = points[..., :2] / points[..., 2:] * 768.0 + 255.5
    start_R = R @ Rotation.from_rotvec(rng.normal(0, 0.08, (N, 3))).as_matrix()  # ~5 degrees off
    start_t = t + rng.normal(0, 1.5, (N, 3)) * [1, 1, 2]
    result = fitting.fit(layer, embedding.triangles, embedding.bary, observed, np.ones(N, bool), K, start_R, start_t,
                         fitting.FitSettings(iterations=8, shape_prior=1e-3, expression_prior=1e-3, smooth=0.1), video=True)
    fitted = fitting.full_mesh(layer, result.shape, result.expression, result.jaw, result.neck)
    cam_fit = np.einsum("nij,nvj->nvi", result.rotation, fitted) + result.translation[:, None]
    face = np.unique(model.faces[embedding.triangles])
    face_mm = np.linalg.norm(cam_fit[:, face] - cam[:, face], axis=-1).mean() * 10
    head_mm = np.linalg.norm(cam_fit - cam, axis=-1).mean() * 10
    turn = lambda Rg, nk: Rg @ Rotation.from_rotvec(nk * [1, -1, -1]).as_matrix()  # noqa: E731 - FLAME->head axes
    rel = np.einsum("nji,njk->nik", turn(R, neck), turn(result.rotation, result.neck))
    rot_deg = np.degrees(np.linalg.norm(Rotation.from_matrix(rel).as_rotvec(), axis=1))
    jaw_deg = np.degrees(np.abs(result.jaw[:, 0] - jaw[:, 0]))
    report = (f"reprojection {np.mean(result.error):.3%} of the face width, face vertices {face_mm:.2f} mm, "
              f"whole head {head_mm:.2f} mm, head rotation {rot_deg.mean():.2f} deg (max {rot_deg.max():.2f}), "
              f"jaw {jaw_deg.mean():.2f} deg")
    print(report)
    # Measured (2026-12-01): 0.11 %, 4.1 mm, 4.6 mm, 1.8 deg (max 2.3), jaw 0.4 deg. What remains is the
    # monocular depth/scale ambiguity (a slightly larger head slightly farther away), not the optimiser.
    assert np.mean(result.error) < 0.003, report
    assert face_mm < 6.0 and head_mm < 8.0, report
    assert rot_deg.mean() < 3.0 and rot_deg.max() < 5.0, report
    assert jaw_deg.mean() < 1.5, report


# ---------------------------------------------------------------------------------------------- the tracker


def test_tiny_run_end_to_end_with_the_flame_tracker(store, model_file, tmp_path, capsys, monkeypatch):
    """meshwarp (which tracks the portrait with the run's tracker), the flame tracker, the mediapipe segmenter on
    its tracking; the field and restorer are the test fakes so the file stays within a minute on 2 cores (the
    same run with insta and the reference restorer: see the module's report in benchmarks/RESULTS.md)."""
    import shutil

    from ophav_core import plugins

    monkeypatch.setenv("OPHAV_TEST_FAKES", "1")
    plugins.reset_host()

    from ophav_core.cli import main
    from ophav_core.stages import Tracking
    from pathlib import Path

    store.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, store / "generic_model.pkl")
    portrait = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        # The defaults: meshwarp sizes its crop on the face outline, not on the full head (neck, scalp).
        main(["run", str(portrait), "--out", str(out), "--tracker", "flame", "--field", "fake", "--restorer", "fake",
              "--profile", "tiny", "--device", "cpu", "-q", "--rounds", "1"])
    assert info.value.code == 0, capsys.readouterr().err
    tracking = Tracking.load(out / "track" / "tracking.npz")
    assert tracking.mesh_type == "flame" and tracking.vertices.shape[1:] == (5023, 3)
    assert tracking.faces.shape == (9976, 3) and {"left_eyeball", "jaw", "face_oval"} <= set(tracking.semantic)
    rebuilt = tracking.mesh_for(tracking.rotation, tracking.translation, tracking.expression)
    assert np.abs(rebuilt - tracking.vertices).max() < 1e-3 * np.ptp(tracking.canonical_vertices)
    assert (out / "avatar" / "avatar.ckpt").is_file()
    portrait_tracking = Tracking.load(out / "input" / "portrait_tracking.npz")
    assert portrait_tracking.mesh_type == "flame" and len(portrait_tracking) == 1


@pytest.mark.data
def test_tracker_contract_and_named_expressions_on_a_driving_video(store, model_file, shared_data):
    """The Tracker contract (mesh rebuilt from the basis, rotations, the five landmarks, reference=) on 12 frames
    of a real video, the landmarks within 1.5 % of the face width with the synthetic model, and a named expression
    (MediaPipe's smile carried through the embedding) moving the mouth corners."""
    import shutil

    from ophav_core.media import read_video
    from ophav_core.plugins import get_host
    from ophav_core.stages.motion import Motion
    from ophav_core.testing.contracts import check_tracker, tiny_context

    store.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, store / "generic_model.pkl")
    frames = read_video(shared_data / "driving" / "talk_78f.mp4", max_frames=12)
    tracker = get_host().registry.get("tracker", "flame").create({}, tiny_context())
    tracking = check_tracker(tracker, frames)
    assert tracking.mesh_type == "flame" and tracking.vertices.shape == (12, 5023, 3)
    assert np.nanmean(tracker.last_fit["reprojection"]) < 0.015, tracker.last_fit["reprojection"]
    n = 3
    smile = Motion(fps=5.0, yaw=np.zeros(n), pitch=np.zeros(n), roll=np.zeros(n),
                   expressions={"smile": np.array([0.0, 0.5, 1.0])})
    offsets = tracker.expression_offsets(smile, tracking)
    assert offsets.shape == (n, 5023, 3) and np.abs(offsets[0]).max() < 1e-6
    corners = np.concatenate([tracking.semantic["mouth_left"], tracking.semantic["mouth_right"]])
    moved = np.linalg.norm(offsets[2], axis=1)
    assert moved[corners].mean() > 0.1 and moved[corners].mean() > 3 * np.median(moved), moved[corners]
    # A long video is fitted in chunks with the shape from frames spread over it (here: chunks of 5 frames).
    import ophav_flame.tracker as module

    module._CHUNK, module._SHAPE_FRAMES = 5, 6
    try:
        chunked = tracker.track(frames)
    finally:
        module._CHUNK, module._SHAPE_FRAMES = 256, 128
    assert chunked.vertices.shape == (12, 5023, 3)
    assert np.nanmean(tracker.last_fit["reprojection"]) < 0.015, tracker.last_fit["reprojection"]
