"""Re-posing a tracked portrait: one backward warp per frame, built from the face mesh.

For a frame with relative head rotation ``R_d`` and head-space expression offsets, the portrait's tracked mesh is
deformed and turned about the head's centre (relative driving, as in FOMM), projected with the portrait's camera,
and rasterised. Each output pixel inside the mesh samples the portrait through its triangle's affine map; outside,
a thin-plate displacement field (:mod:`ophav_meshwarp.field`) moves hair, ears and neck with the head and keeps
the far background still. Triangles the portrait shows badly (turned away or hidden) sample their mirror
triangle instead, brightness-matched; the mouth and eyes get the fills of :mod:`ophav_meshwarp.fills`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ophav_meshwarp.field import HeadRings, border_points, head_rings, thin_plate_field
from ophav_meshwarp.fills import mouth_interior, smoothstep
from ophav_meshwarp.raster import evaluate_affines, facing_camera, rasterise_ids, signed_areas, triangle_affines
from ophav_meshwarp.topology import MeshParts, contour_opening


@dataclass(frozen=True)
class WarpSettings:
    """The knobs of the warp (the component's options, resolved)."""

    symmetry_fill: bool = True
    mouth_fill: bool = True
    eye_fill: bool = True
    neck_follow: float = 0.35
    pivot_depth: float = 0.65
    field_grid: int = 40
    feather_px: float = 1.5


@dataclass
class SourceFace:
    """Everything about the (cropped) portrait that every frame reuses."""

    image: np.ndarray  # (S, S, 3) uint8
    K: np.ndarray  # (3, 3)
    rotation: np.ndarray  # (3, 3) head -> camera
    translation: np.ndarray  # (3,)
    local: np.ndarray  # (V, 3) the tracked face in head space
    points2d: np.ndarray  # (V, 2) where the mesh lies in the image
    face_width: float  # head-space units
    face_width_px: float
    pivot: np.ndarray  # (3,) head centre, head space
    parts: MeshParts
    rings: HeadRings
    rings2d: np.ndarray  # (P, 2) the head rings in the portrait
    border: np.ndarray  # (B, 2)
    mirror_weight: np.ndarray  # (F,) how much each triangle samples its mirror instead
    mirror_gain: np.ndarray  # (F, 3) colour gain applied to mirrored samples
    lip_colour: np.ndarray  # (3,)
    lid_colour: np.ndarray  # (2, 3) skin just above each eye
    mouth_open_px: float
    eye_open_px: np.ndarray  # (2,)
    settings: WarpSettings = field(default_factory=WarpSettings)
    _pixel_grid: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.image.shape[0])

    def pixel_grid(self) -> np.ndarray:
        if self._pixel_grid is None:
            s = self.size
            xs, ys = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32))
            self._pixel_grid = np.stack([xs, ys], axis=-1)
        return self._pixel_grid


def project(K: np.ndarray, points_cam: np.ndarray) -> np.ndarray:
    z = np.clip(points_cam[..., 2:3], 1e-6, None)
    uv = points_cam[..., :2] / z
    return np.stack([K[0, 0] * uv[..., 0] + K[0, 2], K[1, 1] * uv[..., 1] + K[1, 2]], axis=-1)


def _triangle_means(image: np.ndarray, ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-triangle pixel counts (F,) and mean colours (F, 3) of ``image`` under the id map."""
    flat = ids.ravel()
    keep = flat >= 0
    tri = flat[keep]
    pixels = np.bincount(tri, minlength=count).astype(np.float64)
    colours = np.stack([np.bincount(tri, weights=image[..., c].ravel()[keep], minlength=count) for c in range(3)], 1)
    return pixels, colours / np.maximum(pixels, 1.0)[:, None]


def _mirror_faces(faces: np.ndarray, symmetry: np.ndarray) -> np.ndarray:
    """(F,) index of each triangle's mirror triangle (itself when the mesh has none)."""
    key = {tuple(sorted(f)): i for i, f in enumerate(faces.tolist())}
    mirrored = symmetry[faces]
    return np.array([key.get(tuple(sorted(m)), i) for i, m in enumerate(mirrored.tolist())], np.int64)


def _visibility(vertices_cam: np.ndarray, points2d: np.ndarray, faces: np.ndarray, ids: np.ndarray,
                pixels: np.ndarray) -> np.ndarray:
    """(F,) how well the portrait shows each triangle: the cosine of its view angle, scaled down when another
    part of the face (the nose, a cheek) hides it."""
    cosine = np.clip(facing_camera(vertices_cam, faces), 0.0, 1.0)
    area = np.abs(signed_areas(points2d, faces))
    ratio = np.where(area >= 3.0, pixels / np.maximum(area, 1e-6), 1.0)
    return cosine * np.clip(ratio / 0.6, 0.0, 1.0)


def _mirror_gains(parts: MeshParts, quality: np.ndarray, mirror: np.ndarray, colours: np.ndarray,
                  pixels: np.ndarray) -> np.ndarray:
    """(F, 3) colour gains for mirrored samples: per side of the face, the ratio of the mean colour of that
    side's well-seen triangles to that of their mirrors (the two sides are often lit differently)."""
    gains = np.ones((len(parts.faces), 3))
    both = (quality > 0.5) & (quality[mirror] > 0.5) & (pixels > 0) & (pixels[mirror] > 0)
    for side in (-1, 1):
        sel = both & (parts.side == side)
        if sel.sum() < 5:
            continue
        weight = pixels[sel][:, None]
        own = (colours[sel] * weight).sum(0)
        other = (colours[mirror[sel]] * weight).sum(0)
        gains[parts.side == side] = np.clip(own / np.maximum(other, 1.0), 0.7, 1.4)
    return gains.astype(np.float32)


def prepare_source(image: np.ndarray, K: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
                   vertices_cam: np.ndarray, parts: MeshParts, settings: WarpSettings) -> SourceFace:
    """Precompute the portrait's side of every frame's warp from its tracked mesh (camera space)."""
    size = image.shape[0]
    rotation = np.asarray(rotation, np.float64)
    translation = np.asarray(translation, np.float64)
    vertices_cam = np.asarray(vertices_cam, np.float64)
    local = (vertices_cam - translation) @ rotation  # R^T (X - t)
    points2d = project(K, vertices_cam)
    faces = parts.faces
    face_width = float(np.ptp(local[:, 0]))
    face_width_px = float(np.ptp(points2d[:, 0]))
    # The head turns about a point inside the skull, ``pivot_depth`` face widths behind the nose tip (about
    # level with the ears), not about the face surface.
    oval = local[parts.face_oval]
    pivot = np.array([oval[:, 0].mean(), oval[:, 1].mean(), local[:, 2].min() + settings.pivot_depth * face_width])
    rings = head_rings(local, parts.face_oval, face_width, settings.neck_follow)
    rings2d = project(K, rings.points @ rotation.T + translation)

    keep = facing_camera(vertices_cam, faces) > 0
    ids = rasterise_ids(points2d, vertices_cam[:, 2], faces, (size, size), keep)
    pixels, colours = _triangle_means(image.astype(np.float64), ids, len(faces))
    quality = _visibility(vertices_cam, points2d, faces, ids, pixels)
    mirror = _mirror_faces(faces, parts.symmetry)
    mirror_quality = quality[mirror]
    weight = smoothstep((mirror_quality - quality - 0.15) / 0.25) * smoothstep((0.45 - quality) / 0.25)
    if not settings.symmetry_fill:
        weight = np.zeros_like(weight)
    gains = _mirror_gains(parts, quality, mirror, colours, pixels)

    lips = np.isin(faces, parts.lips_inner).any(axis=1) & ~parts.mouth_faces
    lip_colour = _weighted_mean(colours, pixels, lips, fallback=np.array([150.0, 80.0, 80.0]))
    lid = np.stack([_weighted_mean(colours, pixels, above, fallback=colours[pixels > 0].mean(0) if (pixels > 0).any()
                                   else np.array([180.0, 140.0, 120.0])) for above in parts.above_eye_faces])
    return SourceFace(
        image=np.ascontiguousarray(image), K=np.asarray(K, np.float64), rotation=rotation, translation=translation,
        local=local, points2d=points2d, face_width=face_width, face_width_px=face_width_px, pivot=pivot,
        parts=parts, rings=rings, rings2d=rings2d, border=border_points(size), mirror_weight=weight.astype(np.float32),
        mirror_gain=gains, lip_colour=lip_colour.astype(np.float32), lid_colour=lid.astype(np.float32),
        mouth_open_px=contour_opening(points2d, parts.lips_inner),
        eye_open_px=np.array([contour_opening(points2d, e) for e in parts.eyes]), settings=settings)


def _weighted_mean(colours: np.ndarray, pixels: np.ndarray, select: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    w = pixels * select
    if w.sum() <= 0:
        return np.asarray(fallback, np.float64)
    return (colours * w[:, None]).sum(0) / w.sum()


@dataclass
class FrameInfo:
    """What explains a frame: fill strengths and the target mesh in pixels."""

    mouth_fill: float
    eye_fill: np.ndarray
    mirror_fraction: float
    points2d: np.ndarray


def target_vertices(src: SourceFace, rotation_delta: np.ndarray, offsets_local: np.ndarray | None) -> np.ndarray:
    """Camera-space vertices (V, 3) of the deformed face turned by ``rotation_delta`` about the head centre."""
    local = src.local if offsets_local is None else src.local + offsets_local
    centre = src.rotation @ src.pivot + src.translation
    head = (local - src.pivot) @ src.rotation.T
    return head @ np.asarray(rotation_delta, np.float64).T + centre


def _outer_field(src: SourceFace, rotation_delta: np.ndarray, points2d: np.ndarray) -> np.ndarray:
    """(S, S, 2) backward displacement outside the mesh (thin-plate spline through the control points)."""
    oval = src.parts.face_oval
    centre = src.rotation @ src.pivot + src.translation
    rigid = ((src.rings.points - src.pivot) @ src.rotation.T) @ np.asarray(rotation_delta, np.float64).T + centre
    rigid2d = project(src.K, rigid)
    ring_target = src.rings2d + src.rings.follow[:, None] * (rigid2d - src.rings2d)
    targets = np.concatenate([points2d[oval], ring_target, src.border])
    sources = np.concatenate([src.points2d[oval], src.rings2d, src.border])
    return thin_plate_field(targets, sources - targets, src.size, src.settings.field_grid)


def _soft_inside(mask: np.ndarray, feather_px: float) -> np.ndarray:
    """1 well inside ``mask``, falling to 0 at its edge over ~``feather_px`` pixels (0 outside)."""
    import cv2

    if feather_px <= 0:
        return mask.astype(np.float32)
    m = mask.astype(np.float32)
    k = int(2 * np.ceil(2 * feather_px) + 1)
    soft = cv2.GaussianBlur(m, (k, k), feather_px)
    return np.clip(2.0 * soft - 1.0, 0.0, 1.0) * m


def render_frame(src: SourceFace, rotation_delta: np.ndarray, offsets_local: np.ndarray | None = None
                 ) -> tuple[np.ndarray, FrameInfo]:
    """One output frame (S, S, 3) uint8 for a relative head rotation and head-space expression offsets (V, 3)."""
    import cv2

    size, parts, faces = src.size, src.parts, src.parts.faces
    verts = target_vertices(src, rotation_delta, offsets_local)
    points2d = project(src.K, verts)
    front = facing_camera(verts, faces) > 0.0
    ids = rasterise_ids(points2d, verts[:, 2], faces, (size, size), front)

    # Backward map: the smooth outer field everywhere, the exact mesh map inside the face.
    sample = src.pixel_grid() + _outer_field(src, rotation_delta, points2d)
    affines = triangle_affines(points2d, src.points2d, faces)
    rows, cols, mesh_xy = evaluate_affines(ids, affines)
    inside = _soft_inside(ids >= 0, src.settings.feather_px)[rows, cols][:, None]
    sample[rows, cols] += inside * (mesh_xy - sample[rows, cols])
    out = cv2.remap(src.image, sample[..., 0], sample[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = out.astype(np.float32)

    mirror_fraction = _mirror_fill(src, out, ids, points2d, rows, cols)
    eye_alpha = _eye_fill(src, out, ids, points2d, rows, cols) if src.settings.eye_fill else np.zeros(2)
    mouth_alpha = _mouth_fill(src, out, ids, points2d, rows, cols) if src.settings.mouth_fill else 0.0
    frame = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return frame, FrameInfo(float(mouth_alpha), eye_alpha, mirror_fraction, points2d.astype(np.float32))


def _mirror_fill(src: SourceFace, out: np.ndarray, ids: np.ndarray, points2d: np.ndarray,
                 rows: np.ndarray, cols: np.ndarray) -> float:
    """Resample the triangles the portrait shows badly from their mirror image; returns the share of face
    pixels that did."""
    import cv2

    tri = ids[rows, cols]
    weight = src.mirror_weight[tri]
    use = weight > 0.01
    if not use.any():
        return 0.0
    r, c, tri_u = rows[use], cols[use], tri[use]
    r0, r1, c0, c1 = r.min(), r.max() + 1, c.min(), c.max() + 1
    affines = triangle_affines(points2d, src.points2d[src.parts.symmetry], src.parts.faces)
    _, _, xy = evaluate_affines(ids, affines, r, c)
    map_x = np.zeros((r1 - r0, c1 - c0), np.float32)
    map_y = np.zeros_like(map_x)
    map_x[r - r0, c - c0], map_y[r - r0, c - c0] = xy[:, 0], xy[:, 1]
    mirrored = cv2.remap(src.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # Feather the seam between direct and mirrored samples.
    wmap = np.zeros((r1 - r0, c1 - c0), np.float32)
    wmap[r - r0, c - c0] = weight[use]
    wmap = cv2.GaussianBlur(wmap, (0, 0), max(1.0, src.size / 256)) * (ids[r0:r1, c0:c1] >= 0)
    gains = np.ones((r1 - r0, c1 - c0, 3), np.float32)
    gains[r - r0, c - c0] = src.mirror_gain[tri_u]
    patch = out[r0:r1, c0:c1]
    patch += wmap[..., None] * (mirrored.astype(np.float32) * gains - patch)
    return float(weight.sum() / max(len(rows), 1))


def _eye_fill(src: SourceFace, out: np.ndarray, ids: np.ndarray, points2d: np.ndarray,
              rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Closing eyes: cover what is left of the eye with the eyelid's skin colour and draw the lash line."""
    import cv2

    alphas = np.zeros(2)
    tri = ids[rows, cols]
    for k, contour in enumerate(src.parts.eyes):
        open_src = src.eye_open_px[k]
        if open_src < 0.5:
            continue
        closure = 1.0 - contour_opening(points2d, contour) / open_src
        alpha = float(smoothstep((closure - 0.35) / 0.5))
        alphas[k] = alpha
        if alpha <= 0.0:
            continue
        sel = src.parts.eye_face_owner[tri] == k
        out[rows[sel], cols[sel]] += alpha * (src.lid_colour[k] - out[rows[sel], cols[sel]])
        # The closed lids meet in a dark lash line along the lower lid.
        lower = [v for v in contour if v not in set(src.parts.upper_lid[k].tolist())]
        line = points2d[np.concatenate([[src.parts.upper_lid[k][0]], lower, [src.parts.upper_lid[k][-1]]])]
        ordered = line[np.argsort(line[:, 0])]
        overlay = np.zeros(out.shape[:2], np.float32)
        thickness = max(1, int(round(src.face_width_px / 120)))
        cv2.polylines(overlay, [np.rint(ordered * 16).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA, 4)
        lash = np.array([45.0, 35.0, 35.0], np.float32)
        a = (overlay * alpha * 0.7)[..., None]
        out += a * (lash - out)
    return alphas


def _mouth_fill(src: SourceFace, out: np.ndarray, ids: np.ndarray, points2d: np.ndarray,
                rows: np.ndarray, cols: np.ndarray) -> float:
    """Paint a mouth interior where the mouth opens wider than in the portrait."""
    lips = src.parts.lips_inner
    opening = contour_opening(points2d, lips)
    width = float(np.ptp(points2d[lips, 0])) + 1e-6
    alpha = float(smoothstep((opening - 1.1 * src.mouth_open_px - 0.5) / (0.08 * width + 1.0)))
    if alpha <= 0.0:
        return 0.0
    tri = ids[rows, cols]
    sel = src.parts.mouth_faces[tri]
    if not sel.any():
        return alpha
    r, c = rows[sel], cols[sel]
    affines = triangle_affines(points2d, src.parts.mouth_uv, src.parts.faces)
    _, _, uv = evaluate_affines(ids, affines, r, c)
    colour, edge = mouth_interior(uv[:, 0], uv[:, 1], width, opening, src.lip_colour)
    a = (alpha * edge)[:, None]
    out[r, c] += a * (colour - out[r, c])
    return alpha
