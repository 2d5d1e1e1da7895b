"""Regenerate ``data/canonical_face_mesh.npz`` from the npm package ``@mediapipe/face_mesh``.

The canonical face mesh (468 vertices with UVs, 898 triangles, and the landmark weights MediaPipe's own
geometry pipeline uses for its Procrustes fit) is not in the ``mediapipe`` wheel. The npm package carries it
inside ``face_mesh_solution_packed_assets.data`` (an Emscripten packed-data file whose byte ranges are listed
in ``face_mesh_solution_packed_assets_loader.js``) as ``geometry_pipeline_metadata_landmarks.binarypb``, a
serialized ``mediapipe.GeometryPipelineMetadata`` protobuf. This script:

1. fetches the package with ``npm pack`` (or uses ``--tgz`` / ``--package-dir``),
2. cuts the ``.binarypb`` out of the packed data file,
3. decodes it with the protobuf message classes that ship inside the mediapipe wheel,
4. converts MediaPipe's canonical space (x right, y up, z towards the viewer) to ophav head space (x towards
   image right, y down, z away from the camera): a 180 degree rotation about x, so the triangles keep their
   winding; they are then checked to be counter-clockwise seen from outside,
5. adds named vertex groups (eyes, brows, lips, jaw, nose) from ``mediapipe.solutions.face_mesh_connections``,
6. writes the npz (no pickle) next to this file in ``data/``.

Run: ``python plugins/ophav_mediapipe/make_canonical_mesh.py`` (needs ``npm`` and the ``mediapipe`` extra).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "@mediapipe/face_mesh"
VERSION = "0.4.1657299874"
PACKED_DATA = "face_mesh_solution_packed_assets.data"
LOADER = "face_mesh_solution_packed_assets_loader.js"
MEMBER = "geometry_pipeline_metadata_landmarks.binarypb"
OUT = Path(__file__).resolve().parent / "data" / "canonical_face_mesh.npz"


def fetch_package(work: Path, version: str) -> Path:
    """``npm pack`` the package into ``work`` and unpack it; returns the folder holding its files."""
    subprocess.run(["npm", "pack", f"{PACKAGE}@{version}"], cwd=work, check=True, capture_output=True)
    tgz = next(work.glob("mediapipe-face_mesh-*.tgz"))
    return unpack(tgz, work)


def unpack(tgz: Path, work: Path) -> Path:
    with tarfile.open(tgz) as archive:
        archive.extractall(work, filter="data")
    return work / "package"


def extract_member(package_dir: Path, member: str = MEMBER) -> bytes:
    """Bytes of one file inside the Emscripten packed-data file, located through the loader's file table."""
    loader = (package_dir / LOADER).read_text()
    match = re.search(r"loadPackage\((\{.*?\})\)", loader, re.S)
    if match is None:
        raise RuntimeError(f"{LOADER}: no loadPackage({{...}}) file table found")
    table = json.loads(match.group(1))
    entries = [f for f in table["files"] if f["filename"].endswith("/" + member)]
    if len(entries) != 1:
        raise RuntimeError(f"{LOADER}: expected one entry for {member}, found {len(entries)}")
    data = (package_dir / PACKED_DATA).read_bytes()
    return data[entries[0]["start"]:entries[0]["end"]]


def decode_metadata(raw: bytes) -> dict[str, np.ndarray]:
    from mediapipe.modules.face_geometry.protos import geometry_pipeline_metadata_pb2

    meta = geometry_pipeline_metadata_pb2.GeometryPipelineMetadata()
    meta.ParseFromString(raw)
    mesh = meta.canonical_mesh
    # vertex_type 0 = VERTEX_PT: x, y, z, u, v per vertex; primitive_type 0 = TRIANGLE.
    if mesh.vertex_type != 0 or mesh.primitive_type != 0:
        raise RuntimeError(f"unexpected mesh layout: vertex_type={mesh.vertex_type} primitive_type={mesh.primitive_type}")
    vertex_buffer = np.asarray(mesh.vertex_buffer, np.float64).reshape(-1, 5)
    faces = np.asarray(mesh.index_buffer, np.int64).reshape(-1, 3)
    weights = np.zeros(len(vertex_buffer), np.float64)
    for ref in meta.procrustes_landmark_basis:
        weights[ref.landmark_id] = ref.weight
    return {"xyz": vertex_buffer[:, :3], "uv": vertex_buffer[:, 3:], "faces": faces, "procrustes_weights": weights}


def to_head_space(xyz: np.ndarray) -> np.ndarray:
    """MediaPipe canonical (y up, z towards the viewer) -> ophav head space (y down, z away): rotate 180 deg
    about x. A proper rotation, so triangle winding seen from outside is unchanged."""
    return xyz * np.array([1.0, -1.0, -1.0])


def orient_outwards(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces counter-clockwise seen from outside (OpenCV axes, so "seen" means with y down): the face mesh is an
    open sheet facing the camera, so "outside" is towards -z. Flips the whole mesh only if most triangles are
    inverted, and fails if the winding is inconsistent."""
    tri = vertices[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    # Outward normal points towards the camera (-z) for front-facing triangles. With x right, y down, z away,
    # a triangle counter-clockwise on screen (as a viewer sees it) has cross product along -z.
    towards_camera = normals[:, 2] < 0
    if towards_camera.mean() < 0.5:
        faces = faces[:, [0, 2, 1]]
        towards_camera = ~towards_camera
    if towards_camera.mean() < 0.9:
        raise RuntimeError(f"only {towards_camera.mean():.0%} of triangles face the camera: winding is inconsistent")
    return faces


def _ordered_loop(edges) -> list[int]:
    """Vertices of a closed polyline given as an undirected edge set, in walking order."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = min(neighbours)
    loop, prev = [start], None
    while True:
        options = [n for n in neighbours[loop[-1]] if n != prev]
        nxt = options[0]
        if nxt == start:
            return loop
        prev = loop[-1]
        loop.append(nxt)


def _ordered_path(edges) -> list[int]:
    """Vertices of open polylines (possibly several) given as edges, each walked end to end."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    seen: set[int] = set()
    order: list[int] = []
    for end in sorted(v for v, n in neighbours.items() if len(n) == 1):
        if end in seen:
            continue
        prev, cur = None, end
        while cur is not None:
            order.append(cur)
            seen.add(cur)
            nxt = [n for n in neighbours[cur] if n != prev and n not in seen]
            prev, cur = cur, (nxt[0] if nxt else None)
    return order


def _split_lips(lips) -> tuple[list[int], list[int]]:
    """FACEMESH_LIPS holds two loops: the outer contour (through 61 and 291) and the inner one (78 and 308)."""
    edges = list(lips)
    outer_seed, inner_seed = 61, 78
    comps: dict[int, set] = {}
    for a, b in edges:
        comps.setdefault(a, set()).add(b)
        comps.setdefault(b, set()).add(a)

    def component(seed: int) -> set[int]:
        todo, found = [seed], {seed}
        while todo:
            for n in comps[todo.pop()]:
                if n not in found:
                    found.add(n)
                    todo.append(n)
        return found

    outer, inner = component(outer_seed), component(inner_seed)
    loop_of = lambda verts: _ordered_loop([e for e in edges if e[0] in verts])  # noqa: E731
    return loop_of(outer), loop_of(inner)


def semantic_groups(vertices: np.ndarray) -> dict[str, np.ndarray]:
    """Named vertex groups in ophav's convention (subject's left/right: the subject's left eye is on image
    right, x > 0). MediaPipe names its groups from the subject's point of view too (LEFT_EYE holds 263, which
    lies at x > 0); the check below makes sure."""
    from mediapipe.python.solutions import face_mesh_connections as conn

    left_eye = _ordered_loop(conn.FACEMESH_LEFT_EYE)
    right_eye = _ordered_loop(conn.FACEMESH_RIGHT_EYE)
    if not (vertices[left_eye, 0].mean() > 0 > vertices[right_eye, 0].mean()):
        raise RuntimeError("MediaPipe's LEFT_EYE is not on the subject's left (x > 0) in head space")
    lips_outer, lips_inner = _split_lips(conn.FACEMESH_LIPS)
    oval = _ordered_loop(conn.FACEMESH_FACE_OVAL)
    # Jaw: the part of the face oval below the eyes' level, ordered from the subject's right to left.
    eye_level = vertices[left_eye + right_eye, 1].mean()
    below = {v for v in oval if vertices[v, 1] > eye_level}
    start = min(below, key=lambda v: vertices[v, 0])  # the jaw's end on the subject's right (x < 0)
    at = oval.index(start)
    rolled = oval[at:] + oval[:at]
    if rolled[1] not in below:  # walk the loop the other way, down the jaw
        rolled = [rolled[0]] + rolled[1:][::-1]
    jaw = []
    for v in rolled:
        if v not in below:
            break
        jaw.append(v)
    left_brow = _ordered_path(conn.FACEMESH_LEFT_EYEBROW)
    right_brow = _ordered_path(conn.FACEMESH_RIGHT_EYEBROW)
    nose_all = sorted({v for e in conn.FACEMESH_NOSE for v in e})
    groups = {
        # Eye centres: the mean of each eye contour is what face restorers' 5-point templates mean by "eye".
        "left_eye": left_eye, "right_eye": right_eye,
        "nose": [1],  # nose tip (MediaPipe index 1, the most forward vertex)
        "mouth_left": [291], "mouth_right": [61],  # outer mouth corners (subject's left / right)
        "jaw": jaw, "face_oval": oval,
        "lips_outer": lips_outer, "lips_inner": lips_inner,
        "left_eye_contour": left_eye, "right_eye_contour": right_eye,
        "left_brow": left_brow, "right_brow": right_brow, "brows": left_brow + right_brow,
        "nose_region": nose_all,
    }
    if not vertices[291, 0] > 0 > vertices[61, 0]:
        raise RuntimeError("mouth corner 291 should be on the subject's left (x > 0)")
    if int(np.argmin(vertices[:, 2])) != 1 and vertices[1, 2] > vertices[:, 2].min() + 0.5:
        raise RuntimeError("vertex 1 is not the nose tip")
    return {k: np.asarray(v, np.int32) for k, v in groups.items()}


def build(package_dir: Path) -> dict[str, np.ndarray]:
    meta = decode_metadata(extract_member(package_dir))
    vertices = to_head_space(meta["xyz"])
    faces = orient_outwards(vertices, meta["faces"])
    if vertices.shape != (468, 3) or faces.shape != (898, 3):
        raise RuntimeError(f"unexpected mesh size: {vertices.shape} vertices, {faces.shape} faces")
    arrays = {
        "vertices": vertices.astype(np.float32), "uv": meta["uv"].astype(np.float32), "faces": faces.astype(np.int32),
        "procrustes_weights": meta["procrustes_weights"].astype(np.float32),
        "source": np.array(f"npm {PACKAGE}@{VERSION}: {PACKED_DATA} -> {MEMBER} (Apache-2.0)"),
    }
    arrays.update({f"semantic::{k}": v for k, v in semantic_groups(vertices).items()})
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=VERSION, help="npm package version")
    parser.add_argument("--tgz", type=Path, help="an already downloaded package tarball")
    parser.add_argument("--package-dir", type=Path, help="an already unpacked package folder")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.package_dir:
            package_dir = args.package_dir
        elif args.tgz:
            package_dir = unpack(args.tgz, work)
        else:
            package_dir = fetch_package(work, args.version)
        arrays = build(package_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {arrays['vertices'].shape[0]} vertices, {arrays['faces'].shape[0]} faces, "
          f"{int((arrays['procrustes_weights'] > 0).sum())} Procrustes landmarks")


if __name__ == "__main__":
    main()
