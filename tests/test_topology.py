"""The mesh topology travels in the tracking: a tracker with another vertex order drives meshwarp and the
segmenter, through the registry and ``ophav run --tracker``."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ophav_core.errors import InvalidData
from ophav_core.stages import MeshTopology, Tracking
from ophav_core.testing.synthetic import synthetic_tracking

sys.path.insert(0, str(Path(__file__).resolve().parent / "third_party"))
import permuted_tracker  # noqa: E402

needs_mediapipe = pytest.mark.skipif(importlib.util.find_spec("mediapipe") is None, reason="needs mediapipe")


def _square_topology() -> MeshTopology:
    return MeshTopology(faces=np.array([[0, 2, 1], [0, 3, 2]]), name="square", uv=np.eye(4, 2),
                        groups={"left": np.array([1, 2]), "right": np.array([0, 3])},
                        symmetry=np.array([1, 0, 3, 2]), template=np.arange(12.0).reshape(4, 3))


def test_topology_validates_and_round_trips_without_pickle(tmp_path):
    topology = _square_topology()
    back = MeshTopology.load(topology.save(tmp_path / "topology.npz"))
    assert back.name == "square" and back.num_vertices == 4
    assert np.array_equal(back.faces, topology.faces) and np.array_equal(back.symmetry, topology.symmetry)
    assert back.groups.keys() == topology.groups.keys()
    with pytest.raises(InvalidData, match="mirror"):
        MeshTopology(faces=topology.faces, symmetry=np.array([1, 2, 3, 0]))
    with pytest.raises(InvalidData, match="groups"):
        MeshTopology(faces=topology.faces, groups={"eye": np.array([7])}, num_vertices=4)
    with pytest.raises(InvalidData, match="needs jaw"):
        topology.require("left", "jaw")


def test_permuted_topology_is_the_same_mesh():
    topology = _square_topology()
    order = np.array([2, 0, 3, 1])
    moved = topology.permuted(order)
    # Each triangle, group and mirror pair names the same vertices as before, under their new numbers.
    assert np.array_equal(order[moved.faces], topology.faces)
    assert all(np.array_equal(order[moved.groups[k]], topology.groups[k]) for k in topology.groups)
    assert np.array_equal(order[moved.symmetry], topology.symmetry[order])
    assert np.array_equal(moved.template, topology.template[order]) and np.array_equal(moved.uv, topology.uv[order])


def test_tracking_carries_its_topology(tmp_path):
    base = synthetic_tracking(num_frames=2)
    count = base.canonical_vertices.shape[0]
    mirror = np.arange(count)
    tracking = Tracking(K=base.K, image_size=base.image_size, rotation=base.rotation, translation=base.translation,
                        expression=base.expression, vertices=base.vertices, canonical_vertices=base.canonical_vertices,
                        expression_basis=base.expression_basis, semantic=base.semantic, faces=base.faces,
                        mesh_type=base.mesh_type, symmetry=mirror, uv=np.zeros((count, 2)))
    back = Tracking.load(tracking.save(tmp_path / "tracking.npz"))
    assert np.array_equal(back.topology.symmetry, mirror) and back.topology.uv.shape == (count, 2)
    assert np.array_equal(back.subset(np.array([1])).symmetry, mirror)
    with pytest.raises(InvalidData, match="Tracking.symmetry"):
        Tracking(**{**tracking.__dict__, "symmetry": np.full(count, count)})


@needs_mediapipe
def test_meshwarp_with_another_vertex_order_makes_the_same_video():
    skimage_data = pytest.importorskip("skimage.data")
    from ophav_core.components import registry_components
    from ophav_core.plugins import build_host
    from ophav_core.stages import Portrait
    from ophav_core.stages.motion import default_script, motion_from_script
    from ophav_core.testing.contracts import tiny_context
    from ophav_meshwarp.generator import MeshWarp

    host = build_host(extra_plugins=[("permuted-tracker", permuted_tracker)])
    portrait = Portrait(skimage_data.astronaut(), "astronaut")
    motion = motion_from_script(default_script(), fps=2, duration=4)
    videos = {}
    for tracker in ("mediapipe", "permuted"):
        context = tiny_context()
        context.components = registry_components({"tracker": tracker}, host.registry)
        videos[tracker] = MeshWarp({"resolution": 96}, context).generate(portrait, motion).frames
    assert permuted_tracker.CALLS["expression_offsets"] >= 1
    # The same mesh in another order moves the same pixels (up to float summation order); a group, triangle or
    # mirror pair read in MediaPipe's order would scramble the face.
    difference = np.abs(videos["mediapipe"].astype(float) - videos["permuted"])
    assert difference.mean() < 0.5, difference.mean()


@needs_mediapipe
def test_ophav_run_with_a_third_party_tracker_drives_meshwarp(tmp_path, monkeypatch, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from ophav_core import plugins
    from ophav_core.cli import main
    from ophav_core.media import save_png
    from ophav_core.stages import FrameSet
    from ophav_core.testing.fakes import FakePlugin

    # The real meshwarp and segmenter with the third-party tracker; the fake field and restorer keep it fast.
    host = plugins.build_host(extra_plugins=[("fakes", FakePlugin()), ("permuted-tracker", permuted_tracker)])
    monkeypatch.setattr(plugins, "_HOST", host)
    save_png(tmp_path / "astronaut.png", skimage_data.astronaut())
    permuted_tracker.CALLS.clear()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["run", str(tmp_path / "astronaut.png"), "--out", str(out), "--tracker", "permuted", "--profile", "tiny",
              "--field", "fake", "--restorer", "fake", "--rounds", "1", "--device", "cpu", "-q"])
    assert info.value.code == 0, capsys.readouterr().err
    assert (out / "avatar/avatar.ckpt").is_file()
    # meshwarp tracked the portrait and its crop with the run's tracker, and so did the run's own steps.
    assert permuted_tracker.CALLS["track"] >= 4 and permuted_tracker.CALLS["expression_offsets"] == 1
    assert Tracking.load(out / "track/tracking.npz").mesh_type == permuted_tracker.MESH_TYPE
    frames = FrameSet.load(out / "image2video/frames.npz")
    assert frames.frames.std() > 10 and np.ptp(frames.driving["yaw"]) > 0
