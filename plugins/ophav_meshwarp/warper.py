"""Re-posing a tracked portrait: one backward warp per frame, built from the face mesh.

For a frame with relative head rotation ``R_d`` and head-space expression offsets, the portrait's tracked mesh is
deformed and turned about the head's centre (relative driving, as in FOMM), projected with the portrait's camera,
and rasterised. Each output pixel inside the mesh samples the portrait through its triangle's affine map; outside,
a thin-plate displacement field (:mod:`ophav_meshwarp.field`) through the head shell
(:mod:`ophav_meshwarp.shell`) moves hair, ears and neck with the head and keeps the background still. Face parts
the portrait shows too small for the frame (turned away, hidden by the nose) take their mirror triangle's pixels
(inner face) or a smooth continuation of the skin around them (cheeks); an opening mouth gets a cavity and teeth
(:mod:`ophav_meshwarp.fills`) and closing eyes their lids' skin.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ophav_meshwarp.field import ThinPlateField, border_points, in_plane_angle
from ophav_meshwarp.fills import mouth_interior, smoothstep
from ophav_meshwarp.shell import HeadShell, build_shell
from ophav_core.media.raster import Raster, facing_camera, rasterise, signed_areas
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
    shell: HeadShell  # control points on the head around the face
    still: np.ndarray  # (A, 2) points that stay still: the image border and the background away from the head
    outer_field: ThinPlateField  # the outer warp through the moving control points and the still ones
    mirror_allowed: np.ndarray  # (F,) bool: the triangle may take its mirror's pixels (inner face)
    mirror_face: np.ndarray  # (F,) each triangle's mirror triangle
    source_pixels: np.ndarray  # (F,) pixels of each triangle the portrait shows (0: hidden or turned away)
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


def _background_anchors(head_alpha: np.ndarray, lattice: int = 16, margin: float = 0.1) -> np.ndarray:
    """(A, 2) lattice points well away from the head matte: the background and the body, which stay still.
    ``margin`` (of the image side) leaves room for the head to move over the background next to it."""
    import cv2

    size = head_alpha.shape[0]
    radius = max(1, int(round(margin * size)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    grown = cv2.dilate((head_alpha > 0.05).astype(np.uint8), kernel)
    axis = (np.arange(lattice) + 0.5) * size / lattice - 0.5
    gx, gy = np.meshgrid(axis, axis)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    idx = np.clip(np.rint(points).astype(int), 0, size - 1)
    return points[grown[idx[:, 1], idx[:, 0]] == 0]


def prepare_source(image: np.ndarray, K: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
                   vertices_cam: np.ndarray, parts: MeshParts, settings: WarpSettings,
                   head_alpha: np.ndarray | None = None) -> SourceFace:
    """Precompute the portrait's side of every frame's warp from its tracked mesh (camera space).

    head_alpha: optional (S, S) head matte of the portrait (face, hair, ears; 0 on background and body): the head
    shell reaches out to its edge, and the background away from it is pinned still."""
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
    shell = build_shell(local, points2d, parts.face_oval, pivot, face_width_px, K, rotation, translation,
                        head_alpha, settings.neck_follow, size)
    anchors = _background_anchors(head_alpha) if head_alpha is not None else np.zeros((0, 2))
    still = np.concatenate([border_points(size), anchors])

    ids = rasterise(points2d, vertices_cam[:, 2], faces, (size, size)).ids
    pixels, colours = _triangle_means(image.astype(np.float64), ids, len(faces))
    quality = _visibility(vertices_cam, points2d, faces, ids, pixels)
    mirror = _mirror_faces(faces, parts.symmetry)
    # Only the inner face (eyes, mouth) borrows its mirror's pixels: those features are symmetric and
    # a smooth fill would erase them. The cheeks are smooth anyway, and towards the face's edge the mirror
    # carries hair or background (the mesh's outline never sits exactly on the face's), so they do not.
    # The nose is left out too: its two sides are lit differently and its mirrored edge reads as a second nose.
    centre_x = np.median(local[:, 0])
    inner = (np.abs(local[faces, 0] - centre_x) < 0.3 * face_width).all(axis=1) & ~parts.nose_faces
    gains = _mirror_gains(parts, quality, mirror, colours, pixels)

    lips = np.isin(faces, parts.lips_inner).any(axis=1) & ~parts.mouth_faces
    lip_colour = _weighted_mean(colours, pixels, lips, fallback=np.array([150.0, 80.0, 80.0]))
    lid = np.stack([_skin_colour(image, ids, skin) for skin in parts.lid_skin_faces])
    return SourceFace(
        image=np.ascontiguousarray(image), K=np.asarray(K, np.float64), rotation=rotation, translation=translation,
        local=local, points2d=points2d, face_width=face_width, face_width_px=face_width_px, pivot=pivot,
        parts=parts, shell=shell, still=still,
        outer_field=ThinPlateField(still, size, settings.field_grid), mirror_allowed=inner, mirror_face=mirror,
        source_pixels=pixels.astype(np.float32),
        mirror_gain=gains, lip_colour=lip_colour.astype(np.float32), lid_colour=lid.astype(np.float32),
        mouth_open_px=contour_opening(points2d, parts.lips_inner),
        eye_open_px=np.array([contour_opening(points2d, e) for e in parts.eyes]), settings=settings)


def _skin_colour(image: np.ndarray, ids: np.ndarray, select: np.ndarray) -> np.ndarray:
    """Mean colour of the brighter half of the pixels of the ``select``ed triangles (skin, not lashes or the
    lid crease's shadow); the mean of the whole face when none are visible."""
    covered = ids >= 0
    mask = covered & select[np.where(covered, ids, 0)]
    if mask.sum() < 4:
        mask = covered
    pixels = image[mask].astype(np.float64)
    if len(pixels) == 0:
        return np.array([180.0, 140.0, 120.0])
    luma = pixels @ np.array([0.299, 0.587, 0.114])
    return pixels[luma >= np.median(luma)].mean(axis=0)


def _weighted_mean(colours: np.ndarray, pixels: np.ndarray, select: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    w = pixels * select
    if w.sum() <= 0:
        return np.asarray(fallback, np.float64)
    return (colours * w[:, None]).sum(0) / w.sum()


@dataclass
class FrameInfo:
    """What explains a frame: fill strengths and the target mesh (camera space and in pixels)."""

    mouth_fill: float
    eye_fill: np.ndarray
    unseen_fraction: float
    points2d: np.ndarray
    vertices: np.ndarray


def target_vertices(src: SourceFace, rotation_delta: np.ndarray, offsets_local: np.ndarray | None) -> np.ndarray:
    """Camera-space vertices (V, 3) of the deformed face turned by ``rotation_delta`` about the head centre."""
    local = src.local if offsets_local is None else src.local + offsets_local
    centre = src.rotation @ src.pivot + src.translation
    head = (local - src.pivot) @ src.rotation.T
    return head @ np.asarray(rotation_delta, np.float64).T + centre


def _radial_control(src: SourceFace, raster: "_Raster", depth: np.ndarray, rings: list[np.ndarray],
                    roll: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Where the outer field takes over from each face-oval vertex and from each head-ring point.

    A face-oval vertex that the turned face hides (the far cheek) is moved out along the ray from the face's
    centre to the first pixel outside the visible face: the background and hair beyond the far cheek then
    start right at the visible silhouette instead of the hidden band of face showing a second time outside it.
    A ring point that comes closer to the points inside it than it was in the portrait (it turns behind them) is
    moved out just beyond them: what it carries appears right at the silhouette, and the control points never
    fold over each other. Returns the oval targets (O, 2) and the rings' targets."""
    ids, points2d, oval = raster.ids, raster.points2d, src.parts.face_oval
    size = ids.shape[0]
    start = points2d[oval]
    centre = points2d.mean(axis=0)
    # Rays from the portrait (turned by the head's roll): in the frame a hidden far-side vertex may project
    # near the face's centre, where its own direction would point anywhere.
    src_centre = src.points2d.mean(axis=0)
    src_direction = src.points2d[oval] - src_centre
    src_direction /= np.linalg.norm(src_direction, axis=1, keepdims=True) + 1e-9
    c, s = np.cos(roll), np.sin(roll)
    direction = src_direction @ np.array([[c, s], [-s, c]])
    # Hidden: the face drawn at the vertex's pixel is nearer than the vertex itself.
    pix = np.clip(np.rint(start).astype(int), 0, size - 1)
    covered = ids[pix[:, 1], pix[:, 0]] >= 0
    hidden = np.zeros(len(oval), bool)
    if covered.any():
        front = raster.mesh.interpolate_at(depth, pix[covered, 1], pix[covered, 0])
        hidden[covered] = front < depth[oval][covered] - 0.02 * src.face_width
    steps = np.arange(0.0, 0.5 * src.face_width_px + 1.0, 1.0)
    probe = start[:, None, :] + steps[None, :, None] * direction[:, None, :]  # (O, S, 2)
    col = np.clip(np.rint(probe[..., 0]).astype(int), 0, size - 1)
    row = np.clip(np.rint(probe[..., 1]).astype(int), 0, size - 1)
    outside = ids[row, col] < 0
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), len(steps) - 1)
    targets = np.where(hidden[:, None], start + steps[first][:, None] * direction, start)
    # The gaps between consecutive rings in the portrait, measured the same way, bound the pushes.
    src_reach = ((src.points2d[oval] - src_centre) * src_direction).sum(axis=1)
    reach = ((targets - centre) * direction).sum(axis=1)
    count = len(oval)
    moved = []
    for k, ring in enumerate(rings):
        src_radial = ((src.shell.points2d[k * count:(k + 1) * count] - src_centre) * src_direction).sum(axis=1)
        least = np.minimum(0.05 * src.face_width_px + 1.0, 0.5 * np.maximum(src_radial - src_reach, 0.0))
        radial = ((ring - centre) * direction).sum(axis=1)
        push = np.maximum(reach + least - radial, 0.0)
        moved.append(ring + push[:, None] * direction)
        reach, src_reach = radial + push, src_radial
    return targets, moved


def _outer_field(src: SourceFace, rotation_delta: np.ndarray, raster: "_Raster", depth: np.ndarray) -> np.ndarray:
    """(S, S, 2) backward displacement outside the mesh (thin-plate spline through the control points)."""
    oval = src.parts.face_oval
    rotation_delta = np.asarray(rotation_delta, np.float64)
    centre = src.rotation @ src.pivot + src.translation
    shell = src.shell
    rigid = ((shell.points - src.pivot) @ src.rotation.T) @ rotation_delta.T + centre
    moved = project(src.K, rigid)
    # Outline points keep their place on the (turn-invariant) outline and only roll with the head.
    angle = in_plane_angle(rotation_delta)
    pivot2d = project(src.K, centre[None])[0]
    c, s = np.cos(angle), np.sin(angle)
    rolled = (shell.points2d - pivot2d) @ np.array([[c, s], [-s, c]]) + pivot2d
    moved = np.where(shell.outline[:, None], rolled, moved)
    ring_target = shell.points2d + shell.follow[:, None] * (moved - shell.points2d)
    count = len(oval)
    per_ring = [ring_target[k * count:(k + 1) * count] for k in range(len(ring_target) // count)]
    oval_target, per_ring = _radial_control(src, raster, depth, per_ring, angle)
    targets = np.concatenate([oval_target] + per_ring)
    sources = np.concatenate([src.points2d[oval], shell.points2d])
    return src.outer_field(targets, sources - targets)


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
    """One frame's rasterised target mesh (the core's :class:`~ophav_core.media.raster.Raster`) and the mesh's
    pixel positions."""

    mesh: Raster
    points2d: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return self.mesh.ids

    @property
    def rows(self) -> np.ndarray:
        return self.mesh.ys

    @property
    def cols(self) -> np.ndarray:
        return self.mesh.xs

    def values(self, per_vertex: np.ndarray, select: np.ndarray | None = None):
        """(rows, cols, per-vertex values interpolated there) at the covered pixels (or the ``select``ed ones)."""
        rows, cols = (self.rows, self.cols) if select is None else (self.rows[select], self.cols[select])
        return rows, cols, self.mesh.interpolate(per_vertex, select)


def render_frame(src: SourceFace, rotation_delta: np.ndarray, offsets_local: np.ndarray | None = None
                 ) -> tuple[np.ndarray, FrameInfo]:
    """One output frame (S, S, 3) uint8 for a relative head rotation and head-space expression offsets (V, 3)."""
    import cv2

    size, faces = src.size, src.parts.faces
    verts = target_vertices(src, rotation_delta, offsets_local)
    points2d = project(src.K, verts)
    raster = _Raster(rasterise(points2d, verts[:, 2], faces, (size, size)), points2d)
    ids, rows, cols = raster.ids, raster.rows, raster.cols

    # Backward map: the smooth outer field everywhere, the exact mesh map inside the face.
    sample = src.pixel_grid() + _outer_field(src, rotation_delta, raster, verts[:, 2])
    _, _, mesh_xy = raster.values(src.points2d)
    inside = _soft_inside(ids >= 0, src.settings.feather_px)[rows, cols][:, None]
    sample[rows, cols] += inside * (mesh_xy - sample[rows, cols])
    out = cv2.remap(src.image, sample[..., 0], sample[..., 1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    out = out.astype(np.float32)

    unseen_fraction = _unseen_fill(src, out, raster) if src.settings.symmetry_fill else 0.0
    eye_alpha = _eye_fill(src, out, raster) if src.settings.eye_fill else np.zeros(2)
    mouth_alpha = _mouth_fill(src, out, raster) if src.settings.mouth_fill else 0.0
    frame = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return frame, FrameInfo(float(mouth_alpha), eye_alpha, unseen_fraction, points2d.astype(np.float32),
                            verts.astype(np.float32))


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples (P, 3) float32 of ``image`` at points ``xy`` (P, 2)."""
    import cv2

    if len(xy) == 0:
        return np.zeros((0, 3), np.float32)
    map_x = np.ascontiguousarray(xy[:, 0:1], np.float32)
    map_y = np.ascontiguousarray(xy[:, 1:2], np.float32)
    return cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[:, 0].astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; wide ones run on a downsampled copy (the result is smooth anyway)."""
    import cv2

    factor = int(sigma // 3)
    if factor < 2 or min(image.shape[:2]) < 4 * factor:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def smooth_continuation(image: np.ndarray, seen: np.ndarray, rows: np.ndarray, cols: np.ndarray, blur: float,
                        support: float = 0.1) -> np.ndarray:
    """(P, 3) a smooth continuation of ``image``'s ``seen`` pixels (weights (H, W) in [0, 1]) at the pixels
    ``rows``, ``cols`` (P,).

    Normalised convolution at ``blur`` and at twice, four times... that width, each finer level blended over
    the coarser ones where it has support (its blurred weight above ``support``): pixels far from anything seen
    take the wider levels' colour instead of a ratio of two vanishing sums (which read as black crescents on a
    turned cheek). Past the widest level, the mean of the seen pixels."""
    seen = np.asarray(seen, np.float32)
    total = float(seen.sum())
    weighted = image * seen[..., None]
    mean = weighted.sum(axis=(0, 1)) / total if total > 0 else image.mean(axis=(0, 1))
    levels = []
    width = blur
    while True:
        den = _blur(seen, width)[rows, cols]
        levels.append((_blur(weighted, width)[rows, cols], den))
        if den.min() > support or width > max(image.shape[:2]):
            break
        width *= 2.0
    result = np.broadcast_to(mean.astype(np.float32), (len(rows), 3)).copy()
    for num, den in reversed(levels):
        trust = np.clip(den / support, 0.0, 1.0)[:, None]
        result += trust * (num / np.maximum(den, 1e-6)[:, None] - result)
    return result


def _unseen_fill(src: SourceFace, out: np.ndarray, raster: _Raster) -> float:
    """Face parts the portrait shows too small (turned away, hidden by the nose, or a sliver at the face's
    edge) but the frame shows large: their pixels would be a smear of a few source pixels (often background).
    Inside the face they take their mirror triangle's pixels where the portrait shows those well (brightness
    matched); elsewhere a smooth continuation of the well-seen skin around them (normalised convolution).
    Returns the share of face pixels that were filled."""
    faces = src.parts.faces
    area = np.abs(signed_areas(raster.points2d, faces))
    stretch = area / (src.source_pixels + 1.0)
    unseen = smoothstep((stretch - 2.5) / 1.5) * (area > 1.0)
    tri = raster.ids[raster.rows, raster.cols]
    weight = unseen[tri]
    use = weight > 0.01
    if not use.any():
        return 0.0
    mirror_stretch = area / (src.source_pixels[src.mirror_face] + 1.0)
    mirror_ok = src.mirror_allowed & (mirror_stretch < 2.5)
    r, c, t = raster.rows[use], raster.cols[use], tri[use]
    r0, r1, c0, c1 = r.min(), r.max() + 1, c.min(), c.max() + 1
    sigma = max(1.0, 0.02 * src.face_width_px)
    # Feather the seams: a soft per-pixel weight inside the face.
    wmap = np.zeros((r1 - r0, c1 - c0), np.float32)
    wmap[r - r0, c - c0] = weight[use]
    inside = (raster.ids[r0:r1, c0:c1] >= 0).astype(np.float32)
    wmap = _blur(wmap, sigma) * inside
    fill = out[r0:r1, c0:c1].copy()
    mirrored = mirror_ok[t]
    if mirrored.any():
        sel = np.nonzero(use)[0][mirrored]
        _, _, xy = raster.values(src.points2d[src.parts.symmetry], sel)
        fill[r[mirrored] - r0, c[mirrored] - c0] = _sample(src.image, xy) * src.mirror_gain[t[mirrored]]
    smooth = ~mirrored
    if smooth.any():
        # A continuation of the well-seen face pixels around the patch (pad by a margin of context).
        pad = int(np.ceil(0.3 * src.face_width_px))
        R0, R1 = max(r0 - pad, 0), min(r1 + pad, src.size)
        C0, C1 = max(c0 - pad, 0), min(c1 + pad, src.size)
        seen = (raster.ids[R0:R1, C0:C1] >= 0).astype(np.float32)
        seen[r - R0, c - C0] *= 1.0 - weight[use]
        rr, cc = r[smooth], c[smooth]
        fill[rr - r0, cc - c0] = smooth_continuation(out[R0:R1, C0:C1], seen, rr - R0, cc - C0,
                                                     max(2.0, 0.06 * src.face_width_px))
    patch = out[r0:r1, c0:c1]
    patch += wmap[..., None] * (fill - patch)
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
        if alpha <= 0.0:
            continue
        # The eye's opening, and (less) the stretched lid above it, whose lashes would smear down, become lid
        # skin, with soft edges.
        opening = src.parts.eye_face_owner[tri] == k
        lid = src.parts.above_eye_faces[k][tri]
        sel = opening | lid
        if not sel.any():
            # The eye covers no pixel of this frame (a face a few pixels wide, or the eye turned away): there is
            # nothing to cover, and a lash line drawn there would be a stray dark stroke.
            continue
        alphas[k] = alpha
        r, c = raster.rows[sel], raster.cols[sel]
        r0, r1, c0, c1 = r.min(), r.max() + 1, c.min(), c.max() + 1
        pad = int(np.ceil(2 * max(1.0, 0.01 * src.face_width_px)))
        r0, c0, r1, c1 = max(r0 - pad, 0), max(c0 - pad, 0), min(r1 + pad, src.size), min(c1 + pad, src.size)
        weight = np.zeros((r1 - r0, c1 - c0), np.float32)
        weight[r - r0, c - c0] = np.where(opening[sel], 1.0, 0.6)
        weight = cv2.GaussianBlur(weight, (0, 0), max(0.7, 0.01 * src.face_width_px)) * alpha
        patch = out[r0:r1, c0:c1]
        patch += weight[..., None] * (src.lid_colour[k] - patch)
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
    r, c, uv = raster.values(src.parts.mouth_uv, sel)
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
