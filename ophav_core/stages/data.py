"""Typed data passed between the five stages.

Every container validates itself on construction: a wrong shape, a NaN or a frame-count mismatch raises
:class:`~ophav_core.errors.InvalidData` with a message that names the field. Containers are plain numpy and
save to / load from ``.npz`` files (no pickle), written atomically.

Conventions (shared by every stage):

* Images are ``uint8`` RGB, shape ``(H, W, 3)``; frame stacks ``(N, H, W, 3)``.
* Cameras are pinhole, OpenCV convention: x right, y down, z forward (into the scene); ``K`` maps camera
  coordinates to pixels, ``u = fx * x / z + cx``, pixel centres at integer coordinates.
* Head pose maps the canonical (head) space into camera space: ``X_cam = R @ X_canonical + t``.
* The canonical mesh is the person's neutral face in head space; a frame's mesh is
  ``R @ (canonical + expression_basis . expression) + t``.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ophav_core.errors import InvalidData

# ---------------------------------------------------------------------------------------------- checks


def _check_array(owner: str, name: str, value: Any, shape: tuple, dtype_kind: str | None = None) -> np.ndarray:
    """Check ``value`` against ``shape`` where ints are exact sizes, ``None`` any size and strings named sizes
    that must agree across fields (resolved by the caller through :func:`_bind`)."""
    if not isinstance(value, np.ndarray):
        raise InvalidData(f"{owner}.{name}: expected a numpy array, got {type(value).__name__}")
    if value.ndim != len(shape):
        raise InvalidData(f"{owner}.{name}: expected {len(shape)} dimensions {_fmt(shape)}, got shape {value.shape}")
    for axis, (want, got) in enumerate(zip(shape, value.shape)):
        if isinstance(want, int) and want != got:
            raise InvalidData(f"{owner}.{name}: axis {axis} must be {want} {_fmt(shape)}, got shape {value.shape}")
    if dtype_kind is not None and value.dtype.kind not in dtype_kind:
        kinds = {"u": "uint8", "f": "a float dtype", "iu": "an integer dtype", "b": "bool"}
        raise InvalidData(f"{owner}.{name}: expected {kinds.get(dtype_kind, dtype_kind)}, got {value.dtype}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise InvalidData(f"{owner}.{name}: contains {bad} NaN or infinite values")
    return value


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def _bind(owner: str, sizes: dict[str, int], key: str, value: int, what: str) -> None:
    if key in sizes and sizes[key] != value:
        raise InvalidData(f"{owner}: {what} has {key}={value} but an earlier field has {key}={sizes[key]}")
    sizes.setdefault(key, value)


def _check_indices(owner: str, name: str, index: np.ndarray, count: int) -> None:
    if index.size and (index.min() < 0 or index.max() >= count):
        raise InvalidData(f"{owner}.{name}: vertex indices must lie in [0, {count}), "
                          f"got [{index.min()}, {index.max()}]")


# ---------------------------------------------------------------------------------------------- storage


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _NpzContainer:
    """Save/load for dataclass containers whose fields are arrays, numbers, strings or string lists."""

    _kind: ClassVar[str]

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {"__kind__": np.array(self._kind)}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, dict):
                for key, item in value.items():
                    out[f"{f.name}::{key}"] = np.asarray(item)
            else:
                out[f.name] = np.asarray(value)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]):
        kind = str(arrays.get("__kind__", ""))
        if kind != cls._kind:
            raise InvalidData(f"expected a {cls._kind} file, found {kind or 'something else'}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            nested = {k.split("::", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{f.name}::")}
            if nested:
                kwargs[f.name] = nested
            elif f.name in arrays:
                value = arrays[f.name]
                kwargs[f.name] = value.item() if value.ndim == 0 and value.dtype.kind in "fiUb" else value
        return cls(**kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        buffer = io.BytesIO()
        np.savez(buffer, **self.to_arrays())
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({k: data[k] for k in data.files})


# ---------------------------------------------------------------------------------------------- containers


@dataclass
class Portrait(_NpzContainer):
    """The single input photo.

    image: uint8 (H, W, 3), RGB.
    source: where it came from (a path or a description), for reports.
    """

    image: np.ndarray
    source: str = ""
    _kind: ClassVar[str] = "ophav.Portrait"

    def __post_init__(self) -> None:
        _check_array("Portrait", "image", self.image, (None, None, 3), "u")
        if self.image.dtype != np.uint8:
            raise InvalidData(f"Portrait.image: expected uint8, got {self.image.dtype}")
        if min(self.image.shape[:2]) < 32:
            raise InvalidData(f"Portrait.image: {self.image.shape[1]}x{self.image.shape[0]} is too small (at least 32x32)")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.image.shape[1]), int(self.image.shape[0])


@dataclass
class FrameSet(_NpzContainer):
    """A video as a stack of frames.

    frames: uint8 (N, H, W, 3), RGB.
    fps: frames per second (> 0).
    driving: optional per-frame driving parameters, each array (N, ...) (e.g. ``yaw``/``pitch``/``roll`` in
        degrees, named expression intensities); saved next to the frames so a coarse video can be explained.
    """

    frames: np.ndarray
    fps: float = 25.0
    driving: dict[str, np.ndarray] = field(default_factory=dict)
    _kind: ClassVar[str] = "ophav.FrameSet"

    def __post_init__(self) -> None:
        _check_array("FrameSet", "frames", self.frames, (None, None, None, 3), "u")
        if self.frames.dtype != np.uint8:
            raise InvalidData(f"FrameSet.frames: expected uint8, got {self.frames.dtype}")
        if len(self.frames) == 0:
            raise InvalidData("FrameSet.frames: no frames")
        self.fps = float(self.fps)
        if not self.fps > 0:
            raise InvalidData(f"FrameSet.fps: must be positive, got {self.fps}")
        for key, value in self.driving.items():
            value = np.asarray(value)
            if value.shape[:1] != (len(self.frames),):
                raise InvalidData(f"FrameSet.driving[{key!r}]: has {value.shape[:1]} rows for {len(self.frames)} frames")
            self.driving[key] = value

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.frames.shape[2]), int(self.frames.shape[1])


@dataclass
class MaskSet(_NpzContainer):
    """Per-frame head alpha mattes.

    alpha: float32 (N, H, W) in [0, 1]; 1 = head (face, hair, ears), 0 = background, body and clothes.
    """

    alpha: np.ndarray
    _kind: ClassVar[str] = "ophav.MaskSet"

    def __post_init__(self) -> None:
        _check_array("MaskSet", "alpha", self.alpha, (None, None, None), "f")
        self.alpha = self.alpha.astype(np.float32, copy=False)
        if self.alpha.size and (self.alpha.min() < -1e-6 or self.alpha.max() > 1 + 1e-6):
            raise InvalidData(f"MaskSet.alpha: values must lie in [0, 1], got [{self.alpha.min()}, {self.alpha.max()}]")

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    def check_matches(self, frames: FrameSet) -> None:
        if self.alpha.shape != frames.frames.shape[:3]:
            raise InvalidData(f"MaskSet.alpha has shape {self.alpha.shape} but the frames are {frames.frames.shape[:3]}")


@dataclass
class MeshTopology(_NpzContainer):
    """What a tracker's mesh is, apart from where it is: triangles, texture coordinates, named vertex groups, the
    left/right mirror map and a generic reference shape. Consumers (an image2video that warps with the mesh, a
    segmenter cutting below the jaw, metrics) read these from the tracking, so they work with any tracker
    whose topology has the groups they name, in any vertex order.

    name: the topology's name (``"mediapipe468"``, ``"flame"``...), so a component can refuse what it can't use.
    faces: int32 (F, 3) triangles (vertex indices, counter-clockwise seen from outside).
    uv: float32 (V, 2) optional texture coordinates in [0, 1].
    groups: named vertex groups, ``name -> int64 vertex indices``, in the order the name implies (contours are
        ordered closed loops; subject's left/right). Which names a topology has is its tracker's to document;
        :attr:`Tracking.REQUIRED_SEMANTIC` lists the five every tracking has.
    symmetry: int64 (V,) optional, each vertex's mirror vertex (head x negated); an involution, with vertices on
        the midline their own mirror.
    template: float32 (V, 3) optional, the topology's generic neutral shape in head space (a mean face, not the
        person's): what depends on the mesh's shape alone (which triangles lie above an eye, which half of a
        contour is the upper one) is derived from it the same way for every person.
    """

    faces: np.ndarray
    name: str = "unknown"
    uv: np.ndarray | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    symmetry: np.ndarray | None = None
    template: np.ndarray | None = None
    num_vertices: int | None = None
    _kind: ClassVar[str] = "ophav.MeshTopology"

    def __post_init__(self) -> None:
        owner = "MeshTopology"
        self.name = str(self.name)
        self.faces = _check_array(owner, "faces", np.asarray(self.faces).astype(np.int32), (None, 3), "iu")
        sizes: dict[str, int] = {}
        if self.num_vertices is not None:
            _bind(owner, sizes, "V", int(self.num_vertices), "num_vertices")
        if self.uv is not None:
            self.uv = _check_array(owner, "uv", np.asarray(self.uv, np.float32), (None, 2), "f")
            _bind(owner, sizes, "V", self.uv.shape[0], "uv")
        if self.template is not None:
            self.template = _check_array(owner, "template", np.asarray(self.template, np.float32), (None, 3), "f")
            _bind(owner, sizes, "V", self.template.shape[0], "template")
        if self.symmetry is not None:
            self.symmetry = _check_array(owner, "symmetry", np.asarray(self.symmetry).astype(np.int64), (None,), "iu")
            _bind(owner, sizes, "V", self.symmetry.shape[0], "symmetry")
        count = sizes.get("V", int(self.faces.max()) + 1 if self.faces.size else 0)
        self.num_vertices = count
        _check_indices(owner, "faces", self.faces, count)
        if self.symmetry is not None:
            _check_indices(owner, "symmetry", self.symmetry, count)
            if not np.array_equal(self.symmetry[self.symmetry], np.arange(count)):
                raise InvalidData(f"{owner}.symmetry: the mirror of a vertex's mirror must be the vertex itself")
        for key, value in self.groups.items():
            idx = np.asarray(value).astype(np.int64).reshape(-1)
            if idx.size == 0:
                raise InvalidData(f"{owner}.groups[{key!r}]: empty")
            _check_indices(owner, f"groups[{key!r}]", idx, count)
            self.groups[key] = idx

    def group(self, name: str) -> np.ndarray:
        """The vertex indices of group ``name``; a missing group is an error naming the topology."""
        self.require(name)
        return self.groups[name]

    def require(self, *names: str, user: str = "this component") -> None:
        """Raise :class:`InvalidData` naming every group of ``names`` this topology lacks (and ``symmetry``,
        ``template`` or ``uv`` when named)."""
        optional = {"symmetry": self.symmetry, "template": self.template, "uv": self.uv}
        missing = [n for n in names if (optional[n] is None if n in optional else n not in self.groups)]
        if missing:
            raise InvalidData(f"{user} needs {', '.join(missing)} from the tracking's mesh topology "
                              f"{self.name!r}, which lacks them (it has: {', '.join(sorted(self.groups)) or 'none'})")

    def permuted(self, order: np.ndarray, name: str | None = None) -> "MeshTopology":
        """The same topology with its vertices in another order: new vertex ``i`` is old vertex ``order[i]``;
        triangles, groups, the mirror map, UVs and template follow."""
        order = np.asarray(order, np.int64)
        if not np.array_equal(np.sort(order), np.arange(self.num_vertices)):
            raise InvalidData(f"MeshTopology.permuted: order must be a permutation of {self.num_vertices} vertices")
        new_index = np.empty_like(order)
        new_index[order] = np.arange(len(order))
        pick = lambda a: None if a is None else a[order]  # noqa: E731
        return MeshTopology(
            faces=new_index[self.faces], name=self.name if name is None else name, uv=pick(self.uv),
            groups={k: new_index[v] for k, v in self.groups.items()},
            symmetry=None if self.symmetry is None else new_index[self.symmetry[order]],
            template=pick(self.template), num_vertices=self.num_vertices)

    def tracking_fields(self) -> dict[str, Any]:
        """The keyword arguments of :class:`Tracking` that hold this topology."""
        return {"faces": self.faces, "semantic": dict(self.groups), "mesh_type": self.name, "uv": self.uv,
                "symmetry": self.symmetry, "template": self.template}


@dataclass
class Tracking(_NpzContainer):
    """Camera, head pose, expression and face mesh for every frame.

    K: float64 (3, 3) pinhole intrinsics for images of ``image_size``.
    image_size: int (2,) = (width, height) the intrinsics refer to.
    rotation: float32 (N, 3, 3) head rotation, canonical -> camera.
    translation: float32 (N, 3) head translation, canonical -> camera (same length unit as the mesh).
    expression: float32 (N, E) expression coefficients in ``expression_basis``.
    vertices: float32 (N, V, 3) the tracked mesh of each frame, camera space.
    canonical_vertices: float32 (V, 3) the person's neutral mesh, head space.
    faces: int32 (F, 3) triangles (vertex indices, counter-clockwise seen from outside).
    expression_basis: float32 (E, V, 3) vertex offsets per unit coefficient, head space.
    landmarks: float32 (N, L, 2) optional detected 2D landmarks in pixels (what the tracker saw).
    valid: bool (N,) whether a face was found in the frame (False frames were interpolated).
    semantic: named vertex groups, ``name -> int array of vertex indices``; at least ``left_eye``,
        ``right_eye``, ``nose``, ``mouth_left``, ``mouth_right`` (the subject's left/right) for face alignment.
    mesh_type: the topology's name (``"mediapipe468"``, ``"flame"``...), so a field can refuse what it can't use.
    uv: float32 (V, 2) optional texture coordinates; symmetry: int64 (V,) optional left/right mirror vertex of
        each vertex; template: float32 (V, 3) optional generic neutral shape of the topology (head space).

    ``faces``, ``semantic``, ``mesh_type``, ``uv``, ``symmetry`` and ``template`` are the mesh's topology, the same
    for every frame and person: :attr:`topology` gives them as one validated :class:`MeshTopology`, and
    ``Tracking(..., **topology.tracking_fields())`` builds a tracking from one.
    """

    K: np.ndarray
    image_size: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    vertices: np.ndarray
    canonical_vertices: np.ndarray
    faces: np.ndarray
    expression_basis: np.ndarray
    landmarks: np.ndarray | None = None
    valid: np.ndarray | None = None
    semantic: dict[str, np.ndarray] = field(default_factory=dict)
    mesh_type: str = "unknown"
    uv: np.ndarray | None = None
    symmetry: np.ndarray | None = None
    template: np.ndarray | None = None
    _kind: ClassVar[str] = "ophav.Tracking"

    REQUIRED_SEMANTIC: ClassVar[tuple[str, ...]] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

    def __post_init__(self) -> None:
        owner = "Tracking"
        sizes: dict[str, int] = {}
        self.K = _check_array(owner, "K", np.asarray(self.K, dtype=np.float64), (3, 3), "f")
        self.image_size = _check_array(owner, "image_size", np.asarray(self.image_size).astype(np.int64), (2,), "iu")
        if (self.image_size <= 0).any():
            raise InvalidData(f"Tracking.image_size: must be positive, got {self.image_size}")
        f32 = lambda name: np.asarray(getattr(self, name), dtype=np.float32)  # noqa: E731
        self.rotation = _check_array(owner, "rotation", f32("rotation"), (None, 3, 3), "f")
        _bind(owner, sizes, "N", self.rotation.shape[0], "rotation")
        self.translation = _check_array(owner, "translation", f32("translation"), (None, 3), "f")
        _bind(owner, sizes, "N", self.translation.shape[0], "translation")
        self.expression = _check_array(owner, "expression", f32("expression"), (None, None), "f")
        _bind(owner, sizes, "N", self.expression.shape[0], "expression")
        _bind(owner, sizes, "E", self.expression.shape[1], "expression")
        self.vertices = _check_array(owner, "vertices", f32("vertices"), (None, None, 3), "f")
        _bind(owner, sizes, "N", self.vertices.shape[0], "vertices")
        _bind(owner, sizes, "V", self.vertices.shape[1], "vertices")
        self.canonical_vertices = _check_array(owner, "canonical_vertices", f32("canonical_vertices"), (None, 3), "f")
        _bind(owner, sizes, "V", self.canonical_vertices.shape[0], "canonical_vertices")
        topology = self._topology(sizes["V"])
        self.faces, self.semantic, self.uv, self.mesh_type = topology.faces, topology.groups, topology.uv, topology.name
        self.symmetry, self.template = topology.symmetry, topology.template
        self.expression_basis = _check_array(owner, "expression_basis", f32("expression_basis"), (None, None, 3), "f")
        _bind(owner, sizes, "E", self.expression_basis.shape[0], "expression_basis")
        _bind(owner, sizes, "V", self.expression_basis.shape[1], "expression_basis")
        if self.landmarks is not None:
            self.landmarks = _check_array(owner, "landmarks", f32("landmarks"), (None, None, 2), "f")
            _bind(owner, sizes, "N", self.landmarks.shape[0], "landmarks")
        if self.valid is not None:
            self.valid = _check_array(owner, "valid", np.asarray(self.valid).astype(bool), (None,), "b")
            _bind(owner, sizes, "N", self.valid.shape[0], "valid")

    def _topology(self, num_vertices: int) -> MeshTopology:
        try:
            return MeshTopology(faces=self.faces, name=self.mesh_type, uv=self.uv, groups=dict(self.semantic),
                                symmetry=self.symmetry, template=self.template, num_vertices=num_vertices)
        except InvalidData as exc:  # name the field as the tracking calls it
            message = str(exc).replace("MeshTopology.groups", "Tracking.semantic").replace("MeshTopology", "Tracking")
            raise InvalidData(message) from None

    @property
    def topology(self) -> MeshTopology:
        """The mesh's topology (triangles, UVs, vertex groups, mirror map, template) as one container."""
        return self._topology(self.canonical_vertices.shape[0])

    def __len__(self) -> int:
        return int(self.rotation.shape[0])

    @property
    def num_expressions(self) -> int:
        return int(self.expression.shape[1])

    def check_matches(self, frames: FrameSet) -> None:
        if len(self) != len(frames):
            raise InvalidData(f"Tracking has {len(self)} frames but the frame set has {len(frames)}")
        if tuple(self.image_size) != frames.size:
            raise InvalidData(f"Tracking is for {tuple(self.image_size)} images but the frames are {frames.size}")

    def project(self, points_cam: np.ndarray, K: np.ndarray | None = None) -> np.ndarray:
        """Pixels (..., 2) of camera-space points (..., 3)."""
        K = self.K if K is None else K
        z = np.clip(points_cam[..., 2:3], 1e-6, None)
        uv = points_cam[..., :2] / z
        return np.stack([K[0, 0] * uv[..., 0] + K[0, 2], K[1, 1] * uv[..., 1] + K[1, 2]], axis=-1)

    def landmarks5(self, vertices_cam: np.ndarray | None = None, K: np.ndarray | None = None) -> np.ndarray:
        """(N, 5, 2) float32 pixel positions of left eye, right eye, nose, mouth left, mouth right from the mesh:
        the 5-point layout that face restorers align with."""
        missing = [k for k in self.REQUIRED_SEMANTIC if k not in self.semantic]
        if missing:
            raise InvalidData(f"Tracking.semantic lacks {missing}: needed for 5-point face alignment")
        verts = self.vertices if vertices_cam is None else vertices_cam
        pts = np.stack([verts[:, self.semantic[k]].mean(axis=1) for k in self.REQUIRED_SEMANTIC], axis=1)
        return self.project(pts, K).astype(np.float32)

    def subset(self, index: np.ndarray) -> "Tracking":
        """The tracking of the frames in ``index`` (same camera, mesh and basis)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Tracking(
            K=self.K, image_size=self.image_size, rotation=self.rotation[index], translation=self.translation[index],
            expression=self.expression[index], vertices=self.vertices[index],
            canonical_vertices=self.canonical_vertices, expression_basis=self.expression_basis,
            landmarks=pick(self.landmarks), valid=pick(self.valid), **self.topology.tracking_fields(),
        )

    def joined(self, other: "Tracking") -> "Tracking":
        """This tracking's frames followed by ``other``'s (same camera, mesh and basis; detected landmarks are
        dropped unless both have them)."""
        if other.faces.shape != self.faces.shape or not np.array_equal(other.faces, self.faces) \
                or other.expression_basis.shape != self.expression_basis.shape:
            raise InvalidData("Tracking.joined: the two trackings have different meshes or expression bases")
        if not np.allclose(other.K, self.K) or tuple(other.image_size) != tuple(self.image_size):
            raise InvalidData("Tracking.joined: the two trackings have different cameras")
        both = lambda a, b: None if a is None or b is None else np.concatenate([a, b])  # noqa: E731
        valid = None if self.valid is None and other.valid is None else np.concatenate([
            np.ones(len(self), bool) if self.valid is None else self.valid,
            np.ones(len(other), bool) if other.valid is None else other.valid])
        return Tracking(
            K=self.K, image_size=self.image_size, rotation=np.concatenate([self.rotation, other.rotation]),
            translation=np.concatenate([self.translation, other.translation]),
            expression=np.concatenate([self.expression, other.expression]),
            vertices=np.concatenate([self.vertices, other.vertices]), canonical_vertices=self.canonical_vertices,
            expression_basis=self.expression_basis, landmarks=both(self.landmarks, other.landmarks), valid=valid,
            **self.topology.tracking_fields(),
        )

    def posed_onto(self, target: np.ndarray, camera: np.ndarray | None = None, iterations: int = 20) -> "Tracking":
        """This tracking with every frame's rigid pose refitted so that its own mesh (canonical shape plus the
        frame's expression) projects where ``target`` does: (N, V, 3) camera-space vertices of the same topology,
        such as the mesh a generator drew each frame with, seen through ``camera`` ((3, 3) or (N, 3, 3); this
        tracking's own if None). Shape, expression, landmarks and ``valid`` are kept.

        Pixels, not 3D distances, are what the frame shows (two estimates of a face's shape differ most in
        depth), so the fit is a robust Gauss-Newton on the reprojection error from a 3D Kabsch start; vertices
        this tracking's expression does not explain (a mouth it reads less open than drawn) count less."""
        target = np.asarray(target, np.float64)
        if target.shape != self.vertices.shape:
            raise InvalidData(f"Tracking.posed_onto: target has shape {target.shape}, the tracking's vertices "
                              f"{self.vertices.shape}")
        camera = np.broadcast_to(np.asarray(self.K if camera is None else camera, np.float64), (len(self), 3, 3))
        z = np.clip(target[..., 2:3], 1e-9, None)
        goal = np.einsum("nij,nvj->nvi", camera[:, :2, :2], target[..., :2] / z) + camera[:, None, :2, 2]
        # In chunks of frames: the Jacobians hold 12 floats per vertex and frame (FLAME has 5023 vertices).
        chunk = max(1, 400_000 // self.vertices.shape[1])
        rotation, translation = np.empty((len(self), 3, 3)), np.empty((len(self), 3))
        for lo in range(0, len(self), chunk):
            part = slice(lo, lo + chunk)
            local = (self.canonical_vertices[None].astype(np.float64)
                     + np.einsum("ne,evc->nvc", self.expression[part].astype(np.float64), self.expression_basis))
            rotation[part], translation[part] = _fit_pose_to_pixels(local, target[part], goal[part], self.K,
                                                                    iterations)
        return Tracking(
            K=self.K, image_size=self.image_size, rotation=rotation.astype(np.float32),
            translation=translation.astype(np.float32), expression=self.expression,
            vertices=self.mesh_for(rotation, translation, self.expression).astype(np.float32),
            canonical_vertices=self.canonical_vertices, expression_basis=self.expression_basis,
            landmarks=self.landmarks, valid=self.valid, **self.topology.tracking_fields(),
        )

    def mesh_for(self, rotation: np.ndarray, translation: np.ndarray, expression: np.ndarray) -> np.ndarray:
        """Camera-space vertices (N, V, 3) for poses (N, 3, 3), (N, 3) and expressions (N, E)."""
        local = self.canonical_vertices[None] + np.einsum("ne,evc->nvc", expression, self.expression_basis)
        return np.einsum("nij,nvj->nvi", rotation, local) + translation[:, None, :]


@dataclass
class RenderRequest(_NpzContainer):
    """What to render: N images, each with its own head pose, expression and camera.

    rotation: float32 (N, 3, 3), translation: float32 (N, 3): head pose, canonical -> camera.
    expression: float32 (N, E) in the avatar's expression basis.
    K: float64 (N, 3, 3) intrinsics for ``resolution``.
    resolution: int (2,) = (width, height).
    """

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    K: np.ndarray
    resolution: np.ndarray
    _kind: ClassVar[str] = "ophav.RenderRequest"

    def __post_init__(self) -> None:
        owner, sizes = "RenderRequest", {}
        self.rotation = _check_array(owner, "rotation", np.asarray(self.rotation, np.float32), (None, 3, 3), "f")
        _bind(owner, sizes, "N", self.rotation.shape[0], "rotation")
        self.translation = _check_array(owner, "translation", np.asarray(self.translation, np.float32), (None, 3), "f")
        _bind(owner, sizes, "N", self.translation.shape[0], "translation")
        self.expression = _check_array(owner, "expression", np.asarray(self.expression, np.float32), (None, None), "f")
        _bind(owner, sizes, "N", self.expression.shape[0], "expression")
        K = np.asarray(self.K, np.float64)
        if K.shape == (3, 3):
            K = np.broadcast_to(K, (sizes["N"], 3, 3)).copy()
        self.K = _check_array(owner, "K", K, (None, 3, 3), "f")
        _bind(owner, sizes, "N", self.K.shape[0], "K")
        self.resolution = _check_array(owner, "resolution", np.asarray(self.resolution).astype(np.int64), (2,), "iu")
        if (self.resolution <= 0).any():
            raise InvalidData(f"RenderRequest.resolution: must be positive, got {self.resolution}")

    def __len__(self) -> int:
        return int(self.rotation.shape[0])

    @classmethod
    def from_tracking(cls, tracking: Tracking, index: np.ndarray | None = None, resolution: tuple[int, int] | None = None) -> "RenderRequest":
        """Render the tracked frames (``index``) again, optionally at another resolution (K scaled to match)."""
        index = np.arange(len(tracking)) if index is None else np.asarray(index)
        K = tracking.K.copy()
        size = tuple(int(s) for s in tracking.image_size)
        if resolution is not None and tuple(resolution) != size:
            K = scale_intrinsics(K, size, resolution)
            size = tuple(resolution)
        return cls(tracking.rotation[index], tracking.translation[index], tracking.expression[index], K, np.array(size))

    def subset(self, index: np.ndarray) -> "RenderRequest":
        return RenderRequest(self.rotation[index], self.translation[index], self.expression[index], self.K[index], self.resolution)


@dataclass
class RenderResult(_NpzContainer):
    """rgb: uint8 (N, H, W, 3); alpha: float32 (N, H, W) in [0, 1]; depth: float32 (N, H, W) camera z (0 where empty)."""

    rgb: np.ndarray
    alpha: np.ndarray
    depth: np.ndarray
    _kind: ClassVar[str] = "ophav.RenderResult"

    def __post_init__(self) -> None:
        _check_array("RenderResult", "rgb", self.rgb, (None, None, None, 3), "u")
        self.alpha = _check_array("RenderResult", "alpha", np.asarray(self.alpha, np.float32), self.rgb.shape[:3], "f")
        self.depth = _check_array("RenderResult", "depth", np.asarray(self.depth, np.float32), self.rgb.shape[:3], "f")

    def __len__(self) -> int:
        return int(self.rgb.shape[0])


@dataclass
class RestoreInput:
    """What a restorer gets: the images to sharpen plus everything known about them.

    images: uint8 (N, H, W, 3) renders of the avatar.
    alpha: float32 (N, H, W) their head alpha.
    landmarks5: float32 (N, 5, 2) left eye, right eye, nose, mouth left, mouth right in pixels (exact, from
        the mesh), for alignment to the FFHQ template without a detector.
    vertices2d: float32 (N, V, 2) the mesh projected into each image, and ``vertex_depth`` (N, V) its camera z:
        the dense correspondence to the portrait that reference-guided restorers use.
    portrait: the person's photo; ``portrait_vertices2d`` (V, 2) and ``portrait_vertex_depth`` (V,) its mesh.
    faces: int32 (F, 3) mesh triangles.
    """

    images: np.ndarray
    alpha: np.ndarray
    landmarks5: np.ndarray
    vertices2d: np.ndarray
    vertex_depth: np.ndarray
    portrait: Portrait
    portrait_vertices2d: np.ndarray
    portrait_vertex_depth: np.ndarray
    faces: np.ndarray

    def __post_init__(self) -> None:
        owner, sizes = "RestoreInput", {}
        _check_array(owner, "images", self.images, (None, None, None, 3), "u")
        n, h, w = self.images.shape[:3]
        self.alpha = _check_array(owner, "alpha", np.asarray(self.alpha, np.float32), (n, h, w), "f")
        self.landmarks5 = _check_array(owner, "landmarks5", np.asarray(self.landmarks5, np.float32), (n, 5, 2), "f")
        self.vertices2d = _check_array(owner, "vertices2d", np.asarray(self.vertices2d, np.float32), (n, None, 2), "f")
        _bind(owner, sizes, "V", self.vertices2d.shape[1], "vertices2d")
        self.vertex_depth = _check_array(owner, "vertex_depth", np.asarray(self.vertex_depth, np.float32), (n, sizes["V"]), "f")
        self.portrait_vertices2d = _check_array(owner, "portrait_vertices2d", np.asarray(self.portrait_vertices2d, np.float32), (sizes["V"], 2), "f")
        self.portrait_vertex_depth = _check_array(owner, "portrait_vertex_depth", np.asarray(self.portrait_vertex_depth, np.float32), (sizes["V"],), "f")
        self.faces = _check_array(owner, "faces", np.asarray(self.faces).astype(np.int32), (None, 3), "iu")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def scale_intrinsics(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """K for the same camera at another image size (width, height); pixel centres stay at integers."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    out = np.array(K, dtype=np.float64, copy=True)
    out[0, 0] *= sx
    out[1, 1] *= sy
    out[0, 2] = (out[0, 2] + 0.5) * sx - 0.5
    out[1, 2] = (out[1, 2] + 0.5) * sy - 0.5
    return out


def _kabsch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per batch item, the rotation (N, 3, 3) and translation (N, 3) best mapping points (N, V, 3) onto
    ``target`` in the least-squares sense."""
    mean_source, mean_target = source.mean(axis=1), target.mean(axis=1)
    cov = np.einsum("nvi,nvj->nij", target - mean_target[:, None], source - mean_source[:, None])
    u, _, vt = np.linalg.svd(cov)
    fix = np.ones((len(source), 3))
    fix[:, 2] = np.sign(np.linalg.det(u @ vt))
    rotation = (u * fix[:, None, :]) @ vt
    return rotation, mean_target - np.einsum("nij,nj->ni", rotation, mean_source)


def _rodrigues(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) of rotation vectors (N, 3)."""
    angle = np.linalg.norm(rotvec, axis=1, keepdims=True)
    axis = rotvec / np.maximum(angle, 1e-12)
    cross = np.zeros((len(rotvec), 3, 3))
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    cross = cross - np.swapaxes(cross, 1, 2)
    sin, cos = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3)[None] + sin * cross + (1.0 - cos) * cross @ cross


def _fit_pose_to_pixels(local: np.ndarray, target: np.ndarray, goal: np.ndarray, K: np.ndarray,
                        iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (N, 3, 3) and translations (N, 3) putting head-space points ``local`` (N, V, 3) where the pixels
    ``goal`` (N, V, 2) are through ``K``: Kabsch onto ``target`` (N, V, 3), then Gauss-Newton with Tukey weights
    on the reprojection (see :meth:`Tracking.posed_onto`)."""
    rotation, translation = _kabsch(local, target)
    focal, centre = K[[0, 1], [0, 1]], K[:2, 2]
    weights = np.ones(local.shape[:2])
    for step in range(iterations):
        head = np.einsum("nij,nvj->nvi", rotation, local)
        point = head + translation[:, None]
        pz = np.clip(point[..., 2], 1e-9, None)
        residual = point[..., :2] / pz[..., None] * focal + centre - goal  # (N, V, 2)
        if step >= 2:  # Tukey weights once the Kabsch start has been refined (it is off by depth errors)
            size = np.linalg.norm(residual, axis=-1)
            cut = 3.0 * np.median(size, axis=1, keepdims=True) + 1e-9
            weights = np.clip(1.0 - (size / cut) ** 2, 0.0, None) ** 2
        # d(pixel)/d(point) (N, V, 2, 3); a point moves by -[head]x under a small rotation, by I under a shift
        d_proj = np.zeros(point.shape[:2] + (2, 3))
        d_proj[..., 0, 0], d_proj[..., 1, 1] = focal[0] / pz, focal[1] / pz
        d_proj[..., :, 2] = -(point[..., :2] / pz[..., None] ** 2) * focal
        skew = np.zeros(point.shape[:2] + (3, 3))
        skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = head[..., 2], -head[..., 1], head[..., 0]
        skew = skew - np.swapaxes(skew, -1, -2)  # = -[head]x
        jac = np.concatenate([d_proj @ skew, d_proj], axis=-1).reshape(len(local), -1, 6)  # (N, 2V, 6)
        weighted = np.swapaxes(jac * np.repeat(weights, 2, axis=1)[..., None], 1, 2)
        normal = weighted @ jac
        normal += 1e-6 * np.trace(normal, axis1=1, axis2=2)[:, None, None] * np.eye(6)
        delta = -np.linalg.solve(normal, weighted @ residual.reshape(len(local), -1, 1))[..., 0]
        rotation = _rodrigues(delta[:, :3]) @ rotation
        translation = translation + delta[:, 3:]
    return rotation, translation
