"""Small synthetic data for tests: a head-like ellipsoid mesh with semantic groups, tracked frames of it, and
images that show it. No model and no file is needed; everything is deterministic for a given seed."""
from __future__ import annotations

import numpy as np

from ophav_core.stages.motion import euler_to_matrix
from ophav_core.stages.data import FrameSet, MaskSet, Portrait, RestoreInput, Tracking


def ellipsoid_mesh(rings: int = 12, segments: int = 16, radii=(7.5, 10.0, 8.5)) -> tuple[np.ndarray, np.ndarray]:
    """A closed ellipsoid (vertices (V, 3) in head space: x right, y down, z away from the camera; faces (F, 3)
    counter-clockwise seen from outside), about the size of a head in centimetres."""
    verts = [[0.0, -radii[1], 0.0]]
    for i in range(1, rings):
        phi = np.pi * i / rings
        for j in range(segments):
            theta = 2 * np.pi * j / segments
            verts.append([radii[0] * np.sin(phi) * np.sin(theta), -radii[1] * np.cos(phi),
                          -radii[2] * np.sin(phi) * np.cos(theta)])
    verts.append([0.0, radii[1], 0.0])
    verts = np.asarray(verts, np.float32)
    faces = []
    for j in range(segments):
        faces.append([0, 1 + (j + 1) % segments, 1 + j])
    for i in range(rings - 2):
        a0, b0 = 1 + i * segments, 1 + (i + 1) * segments
        for j in range(segments):
            a, a1 = a0 + j, a0 + (j + 1) % segments
            b, b1 = b0 + j, b0 + (j + 1) % segments
            faces += [[a, a1, b1], [a, b1, b]]
    last = 1 + (rings - 2) * segments
    for j in range(segments):
        faces.append([last + j, last + (j + 1) % segments, len(verts) - 1])
    faces = np.asarray(faces, np.int32)
    # Orient every triangle outwards.
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = (normal * tri.mean(axis=1)).sum(axis=1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return verts, faces


def _nearest(verts: np.ndarray, point) -> np.ndarray:
    return np.array([int(np.argmin(np.linalg.norm(verts - np.asarray(point, np.float32), axis=1)))])


def synthetic_tracking(num_frames: int = 8, size: int = 64, num_expressions: int = 4, seed: int = 0,
                       max_yaw: float = 30.0) -> Tracking:
    """Tracking of an ellipsoid head turning left and right in front of a camera, with random expressions."""
    rng = np.random.default_rng(seed)
    verts, faces = ellipsoid_mesh()
    focal = 2.0 * size
    K = np.array([[focal, 0, (size - 1) / 2], [0, focal, (size - 1) / 2], [0, 0, 1]], np.float64)
    yaw = max_yaw * np.sin(np.linspace(0, 2 * np.pi, num_frames, endpoint=False))
    pitch = 5.0 * np.cos(np.linspace(0, 2 * np.pi, num_frames, endpoint=False))
    R = euler_to_matrix(yaw, pitch, np.zeros(num_frames))
    t = np.tile(np.array([0.0, 0.0, 60.0], np.float32), (num_frames, 1))
    basis = (rng.normal(size=(num_expressions, len(verts), 3)) * 0.3).astype(np.float32)
    basis[:, verts[:, 2] > 0] = 0.0  # only the face side moves
    expression = rng.uniform(-1, 1, size=(num_frames, num_expressions)).astype(np.float32)
    local = verts[None] + np.einsum("ne,evc->nvc", expression, basis)
    cam = np.einsum("nij,nvj->nvi", R, local) + t[:, None]
    semantic = {
        "left_eye": _nearest(verts, [3.0, -2.5, -8.0]), "right_eye": _nearest(verts, [-3.0, -2.5, -8.0]),
        "nose": _nearest(verts, [0.0, 0.5, -8.5]), "mouth_left": _nearest(verts, [2.5, 4.5, -7.5]),
        "mouth_right": _nearest(verts, [-2.5, 4.5, -7.5]),
    }
    tracking = Tracking(K=K, image_size=np.array([size, size]), rotation=R, translation=t, expression=expression,
                        vertices=cam, canonical_vertices=verts, faces=faces, expression_basis=basis,
                        valid=np.ones(num_frames, bool), semantic=semantic, mesh_type="ellipsoid")
    tracking.landmarks = tracking.landmarks5()
    return tracking


def render_synthetic(tracking: Tracking) -> tuple[FrameSet, MaskSet]:
    """Flat-shaded images of the tracked mesh over a grey background, and their exact masks.

    Each frame is a z-buffered splat of the triangles' centres coloured by their canonical position, dense
    enough to look solid at test sizes."""
    width, height = (int(s) for s in tracking.image_size)
    n = len(tracking)
    frames = np.full((n, height, width, 3), 90, np.uint8)
    alpha = np.zeros((n, height, width), np.float32)
    canon = tracking.canonical_vertices
    colour_of = lambda p: np.clip(128 + 10 * p, 0, 255)  # noqa: E731
    # Barycentric samples per triangle.
    bary = np.array([[a, b, 1 - a - b] for a in np.linspace(0, 1, 7) for b in np.linspace(0, 1, 7) if a + b <= 1])
    for i in range(n):
        tri_cam = tracking.vertices[i][tracking.faces]
        pts = np.einsum("sk,fkc->fsc", bary, tri_cam).reshape(-1, 3)
        col = colour_of(np.einsum("sk,fkc->fsc", bary, canon[tracking.faces]).reshape(-1, 3))
        uv = np.rint(tracking.project(pts)).astype(int)
        ok = (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
        order = np.argsort(-pts[ok, 2])  # far first, near overwrites
        u, v = uv[ok][order, 0], uv[ok][order, 1]
        frames[i, v, u] = col[ok][order].astype(np.uint8)
        alpha[i, v, u] = 1.0
    return FrameSet(frames, fps=10.0), MaskSet(alpha)


def synthetic_portrait(size: int = 64, seed: int = 0) -> Portrait:
    tracking = synthetic_tracking(1, size, seed=seed, max_yaw=0.0)
    frames, _ = render_synthetic(tracking)
    return Portrait(frames.frames[0], source="synthetic")


def synthetic_restore_input(num: int = 2, size: int = 64, seed: int = 0) -> RestoreInput:
    tracking = synthetic_tracking(num + 1, size, seed=seed)
    frames, masks = render_synthetic(tracking)
    depth = tracking.vertices[..., 2]
    v2d = tracking.project(tracking.vertices)
    return RestoreInput(images=frames.frames[1:], alpha=masks.alpha[1:], landmarks5=tracking.landmarks5()[1:],
                        vertices2d=v2d[1:], vertex_depth=depth[1:], portrait=Portrait(frames.frames[0], "synthetic"),
                        portrait_vertices2d=v2d[0], portrait_vertex_depth=depth[0], faces=tracking.faces)
