"""INSTA's dataset format in and out: the folder metrical-tracker + INSTA's ``scripts/generate.sh`` make, which
INSTA trains on and FlashAvatar and SplattingAvatar read too.

A folder is in INSTA's format when it holds ``transforms_train.json`` (:func:`is_insta_dataset`). Its files:

* ``transforms_{train,val,test}.json``: intrinsics at the top (``fl_x, fl_y, cx, cy, w, h``; a frame may carry its
  own) and ``frames``, each with ``file_path`` (an RGBA image, e.g. ``images/00042.png``), ``transform_matrix``
  (4x4 camera-to-world), ``mesh_path`` (``meshes/00042.obj``) and ``exp_path`` (``flame/exp/00042.txt``).
  INSTA's generator puts the last ``T`` frames in test, the last 20 in val (inside test) and the rest in train.
* ``meshes/*.obj``: each frame's mesh in world space (FLAME: 5023 vertices, 9976 triangles; any mesh is read,
  all frames must share one topology); ``canonical.obj``: the neutral mesh (FLAME with the jaw 12 degrees open).
* ``flame/exp/*.txt``: the frame's expression coefficients, one per line (100 for metrical-tracker).
* ``images/`` RGBA (RGB, alpha = head matte), ``matted/`` RGBA (the matting output); or a matte beside an RGB
  image in ``masks/``, ``alpha/`` or ``matted/`` (same stem).

Conventions, read from metrical-tracker (``tracker.py``: FLAME's global rotation stays identity, the camera
moves; ``opencv_from_cameras_projection`` gives ``R, t, K``) and INSTA (``scripts/transforms.py`` writes
``transform_matrix = inv([R | t])``; its loader's ``mica_matrix_to_ngp`` uses it without the axis flip
instant-ngp applies to NeRF files):

* ``transform_matrix`` is camera-to-world in **OpenCV** axes (x right, y down, z forward), *not* the
  OpenGL/NeRF axes (y up, z backward) of instant-ngp's own files. World-to-camera is its inverse.
* World space is FLAME's: metres, y up, the face looking along +z, the head at the origin.
* ``cx, cy`` count pixels from the image's corner (pixel ``i`` spans ``[i, i+1]``, the image centre is
  ``w/2``), as PyTorch3D and instant-ngp do; ophav puts pixel centres at integers, so ``cx_ophav = cx - 0.5``.

Mapping onto :class:`~ophav_core.stages.Tracking` (head space x right, y down, z back, centimetres; camera fixed,
head moving): with ``F = diag(1, -1, -1)`` (a rotation by 180 degrees about x) and ``s = UNITS`` (100 head-space
units per world unit),

    head = s * F @ world,      R = R_w2c @ F,      t = s * t_w2c,

so ``R @ head + t = s * (R_w2c @ world + t_w2c)``: every vertex projects to the same pixel. A frame's
``vertices`` are its obj mesh taken to camera space exactly. ``canonical_vertices`` is ``canonical.obj`` (else the
mean unposed mesh); the ``expression`` is the file's coefficients followed by up to :data:`RESIDUAL_COMPONENTS`
principal components (unit variance) of what they leave unexplained (jaw, eyes, eyelids), and
``expression_basis`` the least-squares linear map from them to the meshes, fitted once over every frame of every
split so that the training and held-out frames share it.

Datasets ophav writes (:func:`write_insta`) also carry ``ophav/tracking.npz`` (the tracking's canonical mesh,
expression basis, topology, landmarks and validity; INSTA's tools ignore the folder) and ``ophav/dataset.json``,
so reading them back gives the tracking exactly; the per-frame data still comes from INSTA's files.

Only numpy is imported here; Pillow is imported inside the functions that read and write images.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.stages.data import FrameSet, MaskSet, MeshTopology, Tracking, atomic_write_bytes

SPLITS = ("train", "val", "test")
FLIP = np.diag([1.0, -1.0, -1.0])  # ophav head axes <-> FLAME world axes (and OpenCV <-> OpenGL camera axes)
UNITS = 100.0  # ophav head-space units (centimetres) per INSTA world unit (metres)
RESIDUAL_COMPONENTS = 8
PCA_FRAMES = 400
VAL_FRAMES = 20  # INSTA's generator: val = the last 20 frames (inside test)
MATTE_FOLDERS = ("masks", "alpha", "matted")
SIDECAR = "ophav"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_insta_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is in INSTA's format (it holds ``transforms_train.json``)."""
    return (Path(folder) / "transforms_train.json").is_file()


@dataclass
class InstaDataset:
    """An INSTA-format folder read into ophav's containers: every frame of every split once, in frame order,
    and ``splits`` (split name -> indices into them)."""

    frames: FrameSet
    masks: MaskSet
    tracking: Tracking
    splits: dict[str, np.ndarray]
    names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def held_out(self) -> np.ndarray:
        """The frames of val and test that train lacks (INSTA's val lies inside test)."""
        return self.splits["held_out"] if "held_out" in self.splits else held_out_frames(self.splits)

    def part(self, index: np.ndarray) -> tuple[FrameSet, MaskSet, Tracking]:
        """Frames, masks and tracking of the frames ``index`` (same camera, mesh and basis)."""
        index = np.asarray(index, np.int64)
        if not len(index):
            raise UsageError(f"{self.meta.get('folder', 'the INSTA dataset')}: the split has no frames")
        frames = FrameSet(self.frames.frames[index], self.frames.fps)
        return frames, MaskSet(self.masks.alpha[index]), self.tracking.subset(index)

    def split(self, name: str) -> tuple[FrameSet, MaskSet, Tracking]:
        """Frames, masks and tracking of the split ``name`` (``train``, ``val``, ``test`` or ``held_out``)."""
        if name not in self.splits and name != "held_out":
            raise UsageError(f"{self.meta.get('folder', 'the INSTA dataset')}: no {name} split here "
                             f"(read: {', '.join(self.splits)})")
        return self.part(self.held_out if name == "held_out" else self.splits[name])


def held_out_frames(splits: dict[str, np.ndarray]) -> np.ndarray:
    """The frames of val and test that train lacks (indices of ``splits``)."""
    empty = np.zeros(0, np.int64)
    train = set(splits.get("train", empty).tolist())
    rest = sorted(set(splits.get("val", empty).tolist()) | set(splits.get("test", empty).tolist()))
    return np.array([i for i in rest if i not in train], np.int64)


# ---------------------------------------------------------------------------------------------- cameras


def camera_from_pose(rotation: np.ndarray, translation: np.ndarray, units: float = UNITS) -> np.ndarray:
    """INSTA's ``transform_matrix`` (N, 4, 4): camera-to-world, OpenCV axes, world in metres, from ophav head poses
    (N, 3, 3), (N, 3)."""
    rotation, translation = np.asarray(rotation, np.float64), np.asarray(translation, np.float64)
    w2c = np.tile(np.eye(4), (len(rotation), 1, 1))
    w2c[:, :3, :3] = rotation @ FLIP
    w2c[:, :3, 3] = translation / units
    return np.linalg.inv(w2c)


def pose_from_camera(c2w: np.ndarray, units: float = UNITS) -> tuple[np.ndarray, np.ndarray]:
    """ophav head poses (R (N, 3, 3), t (N, 3)) from INSTA's ``transform_matrix`` (N, 4, 4)."""
    w2c = np.linalg.inv(np.asarray(c2w, np.float64))
    return w2c[:, :3, :3] @ FLIP, w2c[:, :3, 3] * units


def intrinsics_from_insta(fl_x: float, fl_y: float, cx: float, cy: float) -> np.ndarray:
    """ophav's K (pixel centres at integers) from INSTA's intrinsics (pixel ``i`` spans ``[i, i+1]``)."""
    return np.array([[fl_x, 0.0, cx - 0.5], [0.0, fl_y, cy - 0.5], [0.0, 0.0, 1.0]])


def intrinsics_to_insta(K: np.ndarray, size: tuple[int, int]) -> dict[str, float]:
    """INSTA's top-level camera keys (as its ``transforms.py`` writes them) for ophav's K and (width, height)."""
    w, h = (int(s) for s in size)
    fl_x, fl_y = float(K[0, 0]), float(K[1, 1])
    angle_x, angle_y = 2 * math.atan(w / (2 * fl_x)), 2 * math.atan(h / (2 * fl_y))
    return {"w": float(w), "h": float(h), "fl_x": fl_x, "fl_y": fl_y, "cx": float(K[0, 2]) + 0.5,
            "cy": float(K[1, 2]) + 0.5, "camera_angle_x": angle_x, "camera_angle_y": angle_y,
            "x_fov": math.degrees(angle_x), "y_fov": math.degrees(angle_y)}


# ---------------------------------------------------------------------------------------------- meshes


def read_obj(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (F, 3) int32 of a Wavefront obj (polygons fanned into triangles;
    texture and normal indices ignored)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the mesh ({exc.strerror or exc})") from None
    lines = text.splitlines()
    vertex_lines = [line[2:] for line in lines if line.startswith("v ")]
    face_lines = [line[2:] for line in lines if line.startswith("f ")]
    try:
        numbers = np.array(" ".join(vertex_lines).split(), np.float64)  # fast path: exactly x y z per line
        if numbers.size != 3 * len(vertex_lines):  # x y z followed by a colour, or a short line
            numbers = np.array([row.split()[:3] for row in vertex_lines], np.float64)
        verts = numbers.reshape(-1, 3)
    except ValueError:
        raise UsageError(f"{path}: a vertex line does not hold three numbers") from None
    try:
        tri = _obj_faces(face_lines)
    except ValueError:
        raise UsageError(f"{path}: a face line does not hold vertex numbers") from None
    if not len(verts) or not len(tri):
        raise UsageError(f"{path}: not a triangle mesh ({len(verts)} vertices, {len(tri)} faces)")
    tri = np.where(tri < 0, tri + len(verts), tri - 1)  # obj indices are 1-based; negative ones count back
    if tri.min() < 0 or tri.max() >= len(verts):
        raise UsageError(f"{path}: a face refers to a vertex beyond its {len(verts)} vertices")
    return verts, tri.astype(np.int32)


def _obj_faces(face_lines: list[str]) -> np.ndarray:
    joined = " ".join(face_lines)
    if "/" not in joined:  # fast path: triangles without texture or normal indices
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (later: raises) where the text is not all numbers
            try:
                corners = np.fromstring(joined, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                corners = None
        if corners is not None and corners.size == 3 * len(face_lines):
            return corners.reshape(-1, 3)
    faces = []
    for line in face_lines:
        corner = [int(item.split("/")[0]) for item in line.split()]
        faces.extend([corner[0], corner[k], corner[k + 1]] for k in range(1, len(corner) - 1))
    return np.array(faces, np.int64).reshape(-1, 3)


def obj_text(vertices: np.ndarray, faces: np.ndarray) -> str:
    """A Wavefront obj of the vertices and triangles (1-based), with 9 significant digits."""
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in np.asarray(vertices, np.float64)]
    lines += [f"f {a} {b} {c}" for a, b, c in np.asarray(faces, np.int64) + 1]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- images


def _read_picture(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                return np.asarray(image.convert("RGBA"))
            if image.mode in ("L", "I;16", "I", "F"):
                grey = np.asarray(image).astype(np.float64)
                scale = 65535.0 if image.mode in ("I;16", "I") and grey.max() > 255 else 255.0
                return np.clip(np.rint(grey / scale * 255.0), 0, 255).astype(np.uint8)
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the image ({exc})") from None


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _find(folder: Path, relative: str) -> Path | None:
    path = folder / relative
    if path.is_file():
        return path
    for suffix in IMAGE_SUFFIXES:  # NeRF files often name the image without its extension
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _matte_file(folder: Path, image: Path) -> Path | None:
    for name in MATTE_FOLDERS:
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / name / f"{image.stem}{suffix}"
            if candidate.is_file() and candidate != image:
                return candidate
    return None


def _image_and_matte(folder: Path, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    picture = _read_picture(image_path)
    if picture.ndim == 3 and picture.shape[2] == 4:
        return picture[..., :3], picture[..., 3].astype(np.float32) / 255.0
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    matte_path = _matte_file(folder, image_path)
    if matte_path is None:
        raise UsageError(f"{image_path}: no matte for this frame (the image has no alpha channel and none of "
                         f"{', '.join(f'{m}/{image_path.stem}.png' for m in MATTE_FOLDERS)} exists)")
    matte = _read_picture(matte_path)
    matte = matte[..., 3] if matte.ndim == 3 and matte.shape[2] == 4 else matte if matte.ndim == 2 else matte[..., 0]
    if matte.shape != picture.shape[:2]:
        raise UsageError(f"{matte_path}: the matte is {matte.shape[1]}x{matte.shape[0]}, its image "
                         f"{picture.shape[1]}x{picture.shape[0]}")
    return picture, matte.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------- reading


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _load_split(folder: Path, split: str) -> dict[str, Any]:
    path = folder / f"transforms_{split}.json"
    if not path.is_file():
        present = [s for s in SPLITS if (folder / f"transforms_{s}.json").is_file()]
        raise UsageError(f"{folder}: transforms_{split}.json is missing (an INSTA dataset has transforms_train.json, "
                         f"transforms_val.json and transforms_test.json; found {', '.join(present) or 'none'})")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise UsageError(f"{path}: has no 'frames' list")
    return data


def _intrinsics(data: dict[str, Any], frame: dict[str, Any], where: str) -> tuple[float, ...]:
    """(fl_x, fl_y, cx, cy, w, h) of a frame: its own keys over the file's."""
    merged = {**data, **{k: v for k, v in frame.items() if k != "frames"}}
    try:
        w, h = float(merged["w"]), float(merged["h"])
        if "fl_x" in merged:
            fl_x = float(merged["fl_x"])
        else:
            fl_x = 0.5 * w / math.tan(0.5 * float(merged["camera_angle_x"]))
        if "fl_y" in merged:
            fl_y = float(merged["fl_y"])
        elif "camera_angle_y" in merged:
            fl_y = 0.5 * h / math.tan(0.5 * float(merged["camera_angle_y"]))
        else:
            fl_y = fl_x
        cx, cy = float(merged.get("cx", w / 2)), float(merged.get("cy", h / 2))
    except KeyError as exc:
        raise UsageError(f"{where}: no {exc.args[0]} (INSTA gives fl_x, fl_y, cx, cy, w and h)") from None
    except (TypeError, ValueError):
        raise UsageError(f"{where}: an intrinsic (fl_x, fl_y, cx, cy, w, h) is not a number") from None
    return fl_x, fl_y, cx, cy, w, h


def _frame_matrix(frame: dict[str, Any], where: str) -> np.ndarray:
    try:
        matrix = np.array(frame["transform_matrix"], np.float64)
    except KeyError:
        raise UsageError(f"{where}: no transform_matrix") from None
    except (TypeError, ValueError):
        raise UsageError(f"{where}: transform_matrix is not a 4x4 matrix of numbers") from None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0, 0, 0, 1]])
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise UsageError(f"{where}: transform_matrix is not an invertible 4x4 camera-to-world matrix")
    return matrix


def _read_sidecar(folder: Path) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    arrays, meta = None, {}
    if (folder / SIDECAR / "tracking.npz").is_file():
        with np.load(folder / SIDECAR / "tracking.npz", allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    if (folder / SIDECAR / "dataset.json").is_file():
        meta = json.loads((folder / SIDECAR / "dataset.json").read_text())
    return arrays, meta


def fit_expression_basis(offsets: np.ndarray, coefficients: np.ndarray | None,
                         components: int = RESIDUAL_COMPONENTS) -> tuple[np.ndarray, np.ndarray]:
    """Expressions (N, E') and a linear basis (E', V, 3) with ``offsets ~ expression . basis``, for unposed
    offsets from the canonical mesh (N, V, 3): the given coefficients (N, E) through a least-squares basis, then
    up to ``components`` principal components of the residual, scaled to unit variance over the frames."""
    n, v = offsets.shape[:2]
    flat = offsets.reshape(n, -1).astype(np.float64)
    # Residual components below a thousandth of the offsets' main one are the files' rounding, not motion.
    floor = 1e-3 * float(np.linalg.norm(flat, 2)) if flat.size else 0.0
    parts, bases = [], []
    if coefficients is not None and coefficients.shape[1]:
        basis, *_ = np.linalg.lstsq(coefficients.astype(np.float64), flat, rcond=None)
        parts.append(coefficients.astype(np.float64))
        bases.append(basis)
        flat = flat - coefficients @ basis
    if components and n > 1:
        # The directions from at most PCA_FRAMES frames spread over the sequence (an SVD of thousands of FLAME
        # meshes is slow and adds little); every frame's scores are then projected onto them.
        sample = flat[np.unique(np.linspace(0, n - 1, min(n, PCA_FRAMES)).round().astype(int))]
        _, sing, vt = np.linalg.svd(sample, full_matrices=False)
        sing = sing * math.sqrt(n / len(sample))
        keep = int(min(components, (sing > max(floor, 1e-9)).sum()))
        if keep:
            scores = flat @ vt[:keep].T
            std = scores.std(axis=0) + 1e-12
            parts.append(scores / std)
            bases.append(vt[:keep] * std[:, None])
    if not parts:  # a static mesh: one coefficient that is always zero
        return np.zeros((n, 1), np.float32), np.zeros((1, v, 3), np.float32)
    expression = np.concatenate(parts, axis=1).astype(np.float32)
    return expression, np.concatenate(bases, axis=0).reshape(-1, v, 3).astype(np.float32)


def read_insta(folder: str | os.PathLike, units: float | None = None, split: str | None = None) -> InstaDataset:
    """Read an INSTA-format folder: every frame of the three splits (once, in frame order), its images and mattes,
    meshes, expressions and cameras, as ophav's FrameSet, MaskSet and Tracking. ``split`` (``train``, ``val``,
    ``test`` or ``held_out``) keeps that split's frames only and decodes only their images; the tracking's canonical
    mesh and expression basis are fitted over every frame either way, so the splits share them. Malformed folders
    raise a one-line UsageError naming the file."""
    if split is not None and split not in (*SPLITS, "held_out"):
        raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or held_out")
    folder = Path(folder)
    split_data = {name: _load_split(folder, name) for name in SPLITS}
    sidecar, sidecar_meta = _read_sidecar(folder)
    units = float(sidecar_meta.get("units", UNITS) if units is None else units)
    entries: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    members: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name, data in split_data.items():
        for k, frame in enumerate(data["frames"]):
            where = f"{folder / f'transforms_{name}.json'} frame {k}"
            if not isinstance(frame, dict) or "file_path" not in frame:
                raise UsageError(f"{where}: no file_path")
            key = str(frame["file_path"])
            entries.setdefault(key, (frame, data))
            members[name].append(key)
    if not members["train"]:
        raise UsageError(f"{folder / 'transforms_train.json'}: no training frames")
    order = sorted(entries, key=lambda k: _natural_key(str(entries[k][0].get("mesh_path", k))))
    position = {key: i for i, key in enumerate(order)}

    image_paths, c2w, meshes, exps, intrinsics, names = [], [], [], [], [], []
    faces = None
    for key in order:
        frame, data = entries[key]
        where = f"{folder} frame {key}"
        image_path = _find(folder, key)
        if image_path is None:
            raise UsageError(f"{where}: the image {folder / key} does not exist (a frame without an image)")
        names.append(image_path.stem)
        image_paths.append(image_path)
        intrinsics.append(_intrinsics(data, frame, where))
        c2w.append(_frame_matrix(frame, where))
        if "mesh_path" not in frame:
            raise UsageError(f"{where}: no mesh_path (ophav needs each frame's mesh, meshes/NAME.obj)")
        mesh_file = folder / str(frame["mesh_path"])
        if not mesh_file.is_file():
            raise UsageError(f"{where}: the mesh {mesh_file} does not exist")
        verts, tri = read_obj(mesh_file)
        if faces is None:
            faces, first_mesh = tri, mesh_file
        elif len(verts) != len(meshes[0]) or tri.shape != faces.shape or not np.array_equal(tri, faces):
            raise UsageError(f"{mesh_file}: mesh mismatch: {len(verts)} vertices and {len(tri)} triangles, but "
                             f"{first_mesh} has {len(meshes[0])} and {len(faces)} (every frame needs the same mesh "
                             f"topology)")
        meshes.append(verts)
        if "exp_path" in frame and (folder / str(frame["exp_path"])).is_file():
            exps.append(np.atleast_1d(np.loadtxt(folder / str(frame["exp_path"]), dtype=np.float64)).reshape(-1))
        elif "exp_path" in frame:
            raise UsageError(f"{where}: the expression file {folder / str(frame['exp_path'])} does not exist")
        else:
            exps.append(None)

    camera = np.array(intrinsics)
    if not np.allclose(camera, camera[0], rtol=1e-6, atol=1e-6):
        changed = next(i for i in range(len(camera)) if not np.allclose(camera[i], camera[0], rtol=1e-6, atol=1e-6))
        raise UsageError(f"{folder} frame {order[changed]}: its intrinsics differ from frame {order[0]}'s (ophav's "
                         f"tracking has one camera for every frame)")
    fl_x, fl_y, cx, cy, w, h = camera[0]
    K = intrinsics_from_insta(fl_x, fl_y, cx, cy)
    rotation, translation = pose_from_camera(np.stack(c2w), units)
    world = np.stack(meshes)
    w2c = np.linalg.inv(np.stack(c2w))
    vertices = (np.einsum("nij,nvj->nvi", w2c[:, :3, :3], world) + w2c[:, None, :3, 3]) * units
    unposed = units * world @ FLIP  # FLIP is diagonal: head = s * F @ world

    has_exp = [e is not None for e in exps]
    if any(has_exp) and not all(has_exp):
        raise UsageError(f"{folder} frame {order[has_exp.index(False)]}: no exp_path, but other frames have one")
    coefficients = None
    if all(has_exp):
        lengths = {len(e) for e in exps}
        if len(lengths) != 1:
            raise UsageError(f"{folder}: the expression files hold different numbers of coefficients "
                             f"({sorted(lengths)})")
        coefficients = np.stack(exps)

    if sidecar is not None:
        tracking = _tracking_with_sidecar(sidecar, K, (w, h), rotation, translation, coefficients, vertices, faces,
                                          folder)
    else:
        tracking = _tracking_from_meshes(folder, K, (w, h), rotation, translation, coefficients, vertices, unposed,
                                         faces, units)
    splits = {name: np.array([position[k] for k in members[name]], np.int64) for name in SPLITS}
    meta = {"kind": "insta", "folder": str(folder), "units": units, "frames": len(order),
            "splits": {s: len(v) for s, v in splits.items()}, **{k: v for k, v in sidecar_meta.items()
                                                                  if k not in ("units", "fps")}}
    meta.setdefault("tracker", {"name": None, "source": "INSTA format (metrical-tracker)"})
    keep = np.arange(len(order))
    if split is not None:
        keep = held_out_frames(splits) if split == "held_out" else splits[split]
        if not len(keep):
            raise UsageError(f"{folder}: the {split} split has no frames")
        tracking = tracking.subset(keep)
        splits = {split: np.arange(len(keep))}
        names = [names[i] for i in keep]
        meta["split"] = split
    pictures = []
    for i in keep:
        picture, matte = _image_and_matte(folder, image_paths[i])
        if picture.shape[:2] != (int(round(h)), int(round(w))):
            raise UsageError(f"{image_paths[i]}: the image is {picture.shape[1]}x{picture.shape[0]}, the transforms "
                             f"file says {w:g}x{h:g}")
        pictures.append((picture, matte))
    frames = FrameSet(np.stack([p for p, _ in pictures]), fps=float(sidecar_meta.get("fps", 25.0)))
    masks = MaskSet(np.stack([m for _, m in pictures]))
    return InstaDataset(frames, masks, tracking, splits, names, meta)


def _tracking_with_sidecar(sidecar: dict[str, np.ndarray], K, size, rotation, translation, coefficients, vertices,
                           faces, folder: Path) -> Tracking:
    topology = MeshTopology.from_arrays({k[len("topology."):]: v for k, v in sidecar.items()
                                         if k.startswith("topology.")})
    if topology.num_vertices != vertices.shape[1] or not np.array_equal(topology.faces, faces):
        raise UsageError(f"{folder / SIDECAR / 'tracking.npz'}: its mesh topology does not match meshes/*.obj")
    basis = sidecar["expression_basis"]
    if coefficients is None or coefficients.shape[1] != basis.shape[0]:
        raise UsageError(f"{folder}: the expression files do not match {SIDECAR}/tracking.npz's basis "
                         f"({basis.shape[0]} coefficients)")
    n = len(rotation)
    optional = {k: sidecar[k] for k in ("landmarks", "valid") if k in sidecar and len(sidecar[k]) == n}
    return Tracking(K=K, image_size=np.array([int(round(size[0])), int(round(size[1]))]), rotation=rotation,
                    translation=translation, expression=coefficients, vertices=vertices,
                    canonical_vertices=sidecar["canonical_vertices"], expression_basis=basis, **optional,
                    **topology.tracking_fields())


def _tracking_from_meshes(folder: Path, K, size, rotation, translation, coefficients, vertices, unposed, faces,
                          units: float) -> Tracking:
    canonical = None
    if (folder / "canonical.obj").is_file():
        verts, tri = read_obj(folder / "canonical.obj")
        if len(verts) == unposed.shape[1] and np.array_equal(tri, faces):
            canonical = units * verts @ FLIP
    if canonical is None:
        canonical = unposed.mean(axis=0)
    expression, basis = fit_expression_basis(unposed - canonical[None], coefficients)
    flame = unposed.shape[1] == 5023 and len(faces) == 9976
    return Tracking(K=K, image_size=np.array([int(round(size[0])), int(round(size[1]))]), rotation=rotation,
                    translation=translation, expression=expression, vertices=vertices, canonical_vertices=canonical,
                    faces=faces, expression_basis=basis, valid=np.ones(len(rotation), bool),
                    mesh_type="flame" if flame else f"obj{unposed.shape[1]}")


# ---------------------------------------------------------------------------------------------- writing


def insta_splits(count: int, test_frames: int | None = None) -> dict[str, np.ndarray]:
    """INSTA's split of ``count`` frames: test = the last ``test_frames`` (default a tenth, at least one when there
    are two frames or more), val = the last min(20, test_frames), train = the rest."""
    if test_frames is None:
        test_frames = max(1, count // 10) if count > 1 else 0
    if not 0 <= test_frames < count:
        raise UsageError(f"--test-frames {test_frames}: must leave training frames out of {count}")
    index = np.arange(count)
    val = min(VAL_FRAMES, test_frames)
    return {"train": index[:count - test_frames], "val": index[count - val:] if val else index[:0],
            "test": index[count - test_frames:] if test_frames else index[:0]}


def write_insta(folder: str | os.PathLike, frames: FrameSet, masks: MaskSet, tracking: Tracking, *,
                test_frames: int | None = None, units: float = UNITS, meta: dict[str, Any] | None = None) -> Path:
    """Write frames, masks and tracking as an INSTA-format folder (images/ and matted/ RGBA, meshes/*.obj in world
    space, flame/exp/*.txt, canonical.obj, the three transforms files) plus ophav's sidecar."""
    folder = Path(folder)
    masks.check_matches(frames)
    tracking.check_matches(frames)
    n = len(frames)
    names = [f"{i:05d}" for i in range(n)]
    alpha = np.clip(np.rint(masks.alpha * 255.0), 0, 255).astype(np.uint8)
    unposed = np.einsum("nji,nvj->nvi", tracking.rotation.astype(np.float64),
                        tracking.vertices.astype(np.float64) - tracking.translation[:, None].astype(np.float64))
    world = unposed @ FLIP / units
    c2w = camera_from_pose(tracking.rotation, tracking.translation, units)
    records = []
    for i, name in enumerate(names):
        rgba = _png_bytes(np.concatenate([frames.frames[i], alpha[i][..., None]], axis=2))
        atomic_write_bytes(folder / "images" / f"{name}.png", rgba)
        atomic_write_bytes(folder / "matted" / f"{name}.png", rgba)
        atomic_write_bytes(folder / "meshes" / f"{name}.obj", obj_text(world[i], tracking.faces).encode())
        exp = "\n".join(f"{x:.9g}" for x in tracking.expression[i].astype(np.float64)) + "\n"
        atomic_write_bytes(folder / "flame" / "exp" / f"{name}.txt", exp.encode())
        records.append({"file_path": f"images/{name}.png", "mesh_path": f"meshes/{name}.obj",
                        "exp_path": f"flame/exp/{name}.txt", "transform_matrix": c2w[i].tolist()})
    canonical = tracking.canonical_vertices.astype(np.float64) @ FLIP / units
    atomic_write_bytes(folder / "canonical.obj", obj_text(canonical, tracking.faces).encode())
    header = intrinsics_to_insta(tracking.K, tuple(int(s) for s in tracking.image_size))
    splits = insta_splits(n, test_frames)
    everything = {**header, "frames": records}
    atomic_write_bytes(folder / "transforms.json", json.dumps(everything, indent=2).encode())
    for split, index in splits.items():
        body = {**header, "frames": [records[i] for i in index]}
        atomic_write_bytes(folder / f"transforms_{split}.json", json.dumps(body, indent=2).encode())
    extras: dict[str, np.ndarray] = {f"topology.{k}": v for k, v in tracking.topology.to_arrays().items()}
    extras["canonical_vertices"] = tracking.canonical_vertices
    extras["expression_basis"] = tracking.expression_basis
    for key in ("landmarks", "valid"):
        if getattr(tracking, key) is not None:
            extras[key] = getattr(tracking, key)
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **extras)
    atomic_write_bytes(folder / SIDECAR / "tracking.npz", buffer.getvalue())
    description = {"ophav_insta": 1, "units": units, "fps": frames.fps, "frames": n,
                   "splits": {s: len(v) for s, v in splits.items()}, **(meta or {})}
    atomic_write_bytes(folder / SIDECAR / "dataset.json", json.dumps(description, indent=2).encode())
    return folder


__all__ = ["FLIP", "InstaDataset", "SPLITS", "UNITS", "camera_from_pose", "fit_expression_basis", "held_out_frames",
           "insta_splits", "intrinsics_from_insta", "intrinsics_to_insta", "is_insta_dataset", "obj_text",
           "pose_from_camera", "read_insta", "read_obj", "write_insta"]
