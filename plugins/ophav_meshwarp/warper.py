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
from ophav_meshwarp.raster import barycentric_affines, facing_camera, interpolate, rasterise_ids, signed_areas
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


def _radial_control(points2d: np.ndarray, oval: np.ndarray, ids: np.ndarray, face_width_px: float,
                    rings: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Where the outer field takes over from each face-oval vertex, and which head-ring points stay visible.

    A face-oval vertex that the turned face hides (the far cheek) is moved out along the ray from the face's
    centre to the first pixel outside the visible face: the background and hair beyond the far cheek then
    start right at the visible silhouette instead of the hidden band of face showing a second time outside it.
    A ring point is kept only when it lies further out along its ray than the points inside it (the face hides
    it otherwise), so the control points never fold over each other. Returns the oval targets (O, 2) and, per
    ring, a keep mask (O,)."""
    size = ids.shape[0]
    start = points2d[oval]
    centre = points2d.mean(axis=0)
    direction = start - centre
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-9
    steps = np.arange(0.0, 0.5 * face_width_px + 1.0, 1.0)
    probe = start[:, None, :] + steps[None, :, None] * direction[:, None, :]  # (O, S, 2)
    col = np.clip(np.rint(probe[..., 0]).astype(int), 0, size - 1)
    row = np.clip(np.rint(probe[..., 1]).astype(int), 0, size - 1)
    outside = ids[row, col] < 0
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), len(steps) - 1)
    targets = start + steps[first][:, None] * direction
    margin = 0.04 * face_width_px + 1.0
    reach = ((targets - centre) * direction).sum(axis=1)
    keeps = []
    for ring in rings:
        radial = ((ring - centre) * direction).sum(axis=1)
        keep = radial > reach + margin
        keeps.append(keep)
        reach = np.where(keep, radial, reach)
    return targets, keeps


def _outer_field(src: SourceFace, rotation_delta: np.ndarray, points2d: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(S, S, 2) backward displacement outside the mesh (thin-plate spline through the control points)."""
    oval = src.parts.face_oval
    centre = src.rotation @ src.pivot + src.translation
    rigid = ((src.rings.points - src.pivot) @ src.rotation.T) @ np.asarray(rotation_delta, np.float64).T + centre
    rigid2d = project(src.K, rigid)
    ring_target = src.rings2d + src.rings.follow[:, None] * (rigid2d - src.rings2d)
    count = len(oval)
    per_ring = [ring_target[k * count:(k + 1) * count] for k in range(len(ring_target) // count)]
    oval_target, keeps = _radial_control(points2d, oval, ids, src.face_width_px, per_ring)
    keep = np.concatenate(keeps)
    targets = np.concatenate([oval_target, ring_target[keep], src.border])
    sources = np.concatenate([src.points2d[oval], src.rings2d[keep], src.border])
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


@dataclass
class _Raster:
    """One frame's rasterised target mesh."""

    ids: np.ndarray
    bary: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    points2d: np.ndarray

    def values(self, faces: np.ndarray, per_vertex: np.ndarray, select: np.ndarray | None = None):
        """Per-vertex values interpolated at the covered pixels (or the ``select``ed ones)."""
        rows, cols = (self.rows, self.cols) if select is None else (self.rows[select], self.cols[select])
        return interpolate(self.ids, self.bary, faces, per_vertex, rows, cols)


def render_frame(src: SourceFace, rotation_delta: np.ndarray, offsets_local: np.ndarray | None = None
                 ) -> tuple[np.ndarray, FrameInfo]:
    """One output frame (S, S, 3) uint8 for a relative head rotation and head-space expression offsets (V, 3)."""
    import cv2

    size, parts, faces = src.size, src.parts, src.parts.faces
    verts = target_vertices(src, rotation_delta, offsets_local)
    points2d = project(src.K, verts)
    front = facing_camera(verts, faces) > 0.0
    ids = rasterise_ids(points2d, verts[:, 2], faces, (size, size), front)
    rows, cols = np.nonzero(ids >= 0)
    raster = _Raster(ids, barycentric_affines(points2d, faces), rows, cols, points2d)

    # Backward map: the smooth outer field everywhere, the exact mesh map inside the face.
    sample = src.pixel_grid() + _outer_field(src, rotation_delta, points2d, ids)
    _, _, mesh_xy = raster.values(faces, src.points2d)
    inside = _soft_inside(ids >= 0, src.settings.feather_px)[rows, cols][:, None]
    sample[rows, cols] += inside * (mesh_xy - sample[rows, cols])
    out = cv2.remap(src.image, sample[..., 0], sample[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = out.astype(np.float32)

    mirror_fraction = _mirror_fill(src, out, raster)
    eye_alpha = _eye_fill(src, out, raster) if src.settings.eye_fill else np.zeros(2)
    mouth_alpha = _mouth_fill(src, out, raster) if src.settings.mouth_fill else 0.0
    frame = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return frame, FrameInfo(float(mouth_alpha), eye_alpha, mirror_fraction, points2d.astype(np.float32))


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, 3) float32 of ``image`` at points ``xy`` (P, 2)."""
    import cv2

    if len(xy) == 0:
        return np.zeros((0, 3), np.float32)
    map_x = np.ascontiguousarray(xy[:, 0:1], np.float32)
    map_y = np.ascontiguousarray(xy[:, 1:2], np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[:, 0].astype(np.float32)


def _mirror_fill(src: SourceFace, out: np.ndarray, raster: _Raster) -> float:
    """Resample the triangles the portrait shows badly from their mirror image; returns the share of face
    pixels that did."""
    import cv2

    tri = raster.ids[raster.rows, raster.cols]
    weight = src.mirror_weight[tri]
    use = weight > 0.01
    if not use.any():
        return 0.0
    r, c, xy = raster.values(src.parts.faces, src.points2d[src.parts.symmetry], use)
    mirrored = _sample(src.image, xy) * src.mirror_gain[tri[use]]
    # Feather the seam between direct and mirrored samples.
    r0, r1, c0, c1 = r.min(), r.max() + 1, c.min(), c.max() + 1
    wmap = np.zeros((r1 - r0, c1 - c0), np.float32)
    wmap[r - r0, c - c0] = weight[use]
    sigma = max(1.0, src.size / 256)
    wmap = cv2.GaussianBlur(wmap, (0, 0), sigma)[r - r0, c - c0][:, None]
    out[r, c] += wmap * (mirrored - out[r, c])
    return float(weight.sum() / max(len(tri), 1))


def _eye_fill(src: SourceFace, out: np.ndarray, raster: _Raster) -> np.ndarray:
    """Closing eyes: cover what is left of the eye with the eyelid's skin colour and draw the lash line."""
    import cv2

    alphas = np.zeros(2)
    points2d = raster.points2d
    tri = raster.ids[raster.rows, raster.cols]
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
        r, c = raster.rows[sel], raster.cols[sel]
        out[r, c] += alpha * (src.lid_colour[k] - out[r, c])
        # The closed lids meet in a dark lash line along the lower lid.
        upper = src.parts.upper_lid[k]
        lower = np.setdiff1d(contour, upper)
        line = np.concatenate([points2d[upper[[0, -1]]], points2d[lower]])
        ordered = line[np.argsort(line[:, 0])]
        overlay = np.zeros(out.shape[:2], np.float32)
        thickness = max(1, int(round(src.face_width_px / 120)))
        cv2.polylines(overlay, [np.rint(ordered * 16).astype(np.int32)], False, 1.0, thickness, cv2.LINE_AA, 4)
        lash = np.array([45.0, 35.0, 35.0], np.float32)
        out += (overlay * alpha * 0.7)[..., None] * (lash - out)
    return alphas


def _lip_chains(points2d: np.ndarray, parts: MeshParts, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower inner-lip positions (P, 2) at mouth coordinates ``u`` (piecewise linear along the lips)."""
    uv = parts.mouth_uv
    lips = parts.lips_inner
    out = []
    for v_side in (0.0, 1.0):
        chain = lips[(uv[lips, 1] == v_side) | (uv[lips, 1] == 0.5)]
        chain = chain[np.argsort(uv[chain, 0])]
        out.append(np.stack([np.interp(u, uv[chain, 0], points2d[chain, k]) for k in (0, 1)], axis=1))
    return out[0], out[1]


def _mouth_fill(src: SourceFace, out: np.ndarray, raster: _Raster) -> float:
    """The mouth interior of a mouth that opens wider than in the portrait.

    The portrait's interior is kept at its own scale in two bands that move with the lips (upper teeth with the
    upper lip, lower teeth with the lower lip); the gap that opens between them is the procedural cavity of
    :func:`ophav_meshwarp.fills.mouth_interior`. Nothing is stretched. Returns the share of the interior that is
    procedural."""
    tri = raster.ids[raster.rows, raster.cols]
    sel = src.parts.mouth_faces[tri]
    if not sel.any():
        return 0.0
    r, c, uv = raster.values(src.parts.faces, src.parts.mouth_uv, sel)
    u, v = np.clip(uv[:, 0], 0.0, 1.0), np.clip(uv[:, 1], 0.0, 1.0)
    up_t, lo_t = _lip_chains(raster.points2d, src.parts, u)
    up_s, lo_s = _lip_chains(src.points2d, src.parts, u)
    h_t = np.linalg.norm(lo_t - up_t, axis=1)
    h_s = np.linalg.norm(lo_s - up_s, axis=1)
    if not (h_t > h_s + 0.5).any():
        return 0.0
    d_up, d_lo = v * h_t, (1.0 - v) * h_t
    half = 0.5 * h_s
    w_top = smoothstep(half - d_up + 0.5)
    w_bot = smoothstep(half - d_lo + 0.5)
    top = _sample(src.image, up_s + (d_up / np.maximum(h_s, 1e-6))[:, None] * (lo_s - up_s))
    bottom = _sample(src.image, lo_s - (d_lo / np.maximum(h_s, 1e-6))[:, None] * (lo_s - up_s))
    width = float(np.ptp(raster.points2d[src.parts.lips_inner, 0])) + 1e-6
    opening = contour_opening(raster.points2d, src.parts.lips_inner)
    teeth = 1.0 - float(smoothstep(src.mouth_open_px / (0.12 * width)))
    cavity, edge = mouth_interior(u, v, width, opening, src.lip_colour, teeth)
    w_cav = np.clip(1.0 - w_top - w_bot, 0.0, 1.0)
    colour = w_top[:, None] * top + w_bot[:, None] * bottom + w_cav[:, None] * cavity
    # Where the target mouth is narrower than the portrait's, the plain warp (a compression) is right.
    wider = smoothstep(h_t - h_s)[:, None]
    a = wider * np.maximum(edge, 1.0 - w_cav)[:, None]
    out[r, c] += a * (colour - out[r, c])
    return float((w_cav * wider[:, 0]).mean())
