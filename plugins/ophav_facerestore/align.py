"""Face alignment shared by the three restorers: known 5-point landmarks -> similarity transform onto a
template crop -> warp -> (restore) -> inverse warp -> paste with a soft mask.

Landmark order. ``RestoreInput.landmarks5`` lists the *subject's* left eye, right eye, nose, mouth left,
mouth right. The FFHQ template of facexlib/GFPGAN (and GPEN's template) lists points in *image* order: the
eye on the image left first (x = 193 of 512), i.e. the subject's right eye, and likewise the mouth corner on
the image left first. :data:`SUBJECT_TO_TEMPLATE` maps one order to the other.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ophav_core.errors import InvalidData

log = logging.getLogger(__name__)

#: facexlib ``FaceRestoreHelper.face_template`` for a 512 crop (image-left eye, image-right eye, nose tip,
#: image-left mouth corner, image-right mouth corner). GFPGAN and CodeFormer were trained on these crops.
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]], np.float64)

#: template index -> RestoreInput.landmarks5 index: (subject's right eye, left eye, nose, mouth right, mouth left).
SUBJECT_TO_TEMPLATE = (1, 0, 2, 4, 3)

#: facexlib's grey border for the aligned crop (its BGR (135, 133, 132) written in RGB).
FFHQ_BORDER_RGB = (132, 133, 135)


def gpen_template(size: int = 512) -> np.ndarray:
    """GPEN's reference points (``get_reference_facial_points(size, inner_padding_factor=0.25, (0, 0),
    default_square=True)``): the 96x112 face crop points made square, padded by a quarter on every side and
    scaled to ``size``. GPEN-BFR was trained on crops aligned this way (a tighter face than FFHQ's)."""
    points = np.array([[30.29459953, 51.69630051], [65.53179932, 51.50139999], [48.02519989, 71.73660278],
                       [33.54930115, 92.3655014], [62.72990036, 92.20410156]], np.float64)
    crop = np.array([96.0, 112.0])
    points = points + (crop.max() - crop) / 2  # square: centre the 96-wide crop in 112
    side = crop.max()
    pad = side * 0.25 * 2
    points = points + pad / 2
    side = side + round(pad)
    return points * (size / side)


def ffhq_template(size: int = 512) -> np.ndarray:
    return FFHQ_TEMPLATE_512 * (size / 512.0)


def to_template_order(landmarks5: np.ndarray) -> np.ndarray:
    """(..., 5, 2) landmarks in RestoreInput order -> the templates' image order."""
    return np.asarray(landmarks5)[..., SUBJECT_TO_TEMPLATE, :]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, bool]:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` (K, 2)
    onto ``dst`` (K, 2), closed form (Umeyama 1991). Returns the 2x3 matrix and whether the points are
    mirrored relative to ``dst`` (then the best proper similarity is a poor fit: wrong landmark order or a
    face seen from behind)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, sigma, vt = np.linalg.svd(cov)
    mirrored = bool(np.linalg.det(cov) < 0)
    flip = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rotation = u @ flip @ vt
    variance = (src_c ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sigma) @ flip) / max(variance, 1e-12))
    matrix = np.empty((2, 3), np.float64)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix, mirrored


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    linear_inv = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear_inv, -linear_inv @ matrix[:, 2:]], axis=1)


@dataclass
class Alignment:
    """matrices: (N, 2, 3) image -> crop; inverse: (N, 2, 3) crop -> image; usable: (N,) False where the
    landmarks are mirrored or degenerate (that image is returned unrestored)."""

    matrices: np.ndarray
    inverse: np.ndarray
    usable: np.ndarray
    size: int


def align(landmarks5: np.ndarray, template: np.ndarray, size: int) -> Alignment:
    """Similarity transforms taking each face's landmarks (RestoreInput order, pixels) onto ``template``
    (image order, for a ``size`` crop)."""
    points = to_template_order(np.asarray(landmarks5, np.float64))
    n = len(points)
    matrices = np.zeros((n, 2, 3))
    inverse = np.zeros((n, 2, 3))
    usable = np.ones(n, bool)
    for i in range(n):
        matrix, mirrored = similarity_transform(points[i], template)
        scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
        # A face smaller than ~1 px between the eyes maps to a scale beyond 100: nothing to restore.
        if mirrored or not np.isfinite(matrix).all() or scale > 100 * size / 512 or scale < 1e-6:
            usable[i] = False
            matrix = np.array([[1.0, 0, 0], [0, 1.0, 0]])
        matrices[i] = matrix
        inverse[i] = invert_affine(matrix)
    if n and not usable.any():
        raise InvalidData("RestoreInput.landmarks5: no face could be aligned (every landmark set is mirrored or "
                          "degenerate). Expected the subject's left eye, right eye, nose, mouth left, mouth right: "
                          "for a frontal face the subject's left eye is on the image's right")
    if not usable.all():
        log.warning("face alignment: %d of %d images have mirrored or degenerate landmarks; left unrestored",
                    int((~usable).sum()), n)
    return Alignment(matrices, inverse, usable, size)


def warp_faces(images: np.ndarray, alignment: Alignment, border_rgb: tuple[int, int, int]) -> np.ndarray:
    """(N, size, size, 3) uint8 aligned crops."""
    import cv2

    size = alignment.size
    crops = np.empty((len(images), size, size, 3), np.uint8)
    for i, (image, matrix) in enumerate(zip(images, alignment.matrices)):
        crops[i] = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(int(c) for c in border_rgb))
    return crops


def paste_mask(inverse: np.ndarray, size: int, height: int, width: int, soft: bool = True) -> np.ndarray:
    """float32 (H, W) weight of the restored crop in the image. Soft: the crop's footprint eroded and blurred
    by about a twentieth of the face size (facexlib's recipe), so no seam shows; hard: the footprint."""
    import cv2

    footprint = cv2.warpAffine(np.ones((size, size), np.float32), inverse, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if not soft:
        return (footprint >= 0.5).astype(np.float32)
    # Drop the half-covered rim that bilinear sampling of the border leaves.
    inner = cv2.erode(footprint, np.ones((2, 2), np.uint8))
    edge = max(1, int(np.sqrt(float(inner.sum()))) // 20)
    centre = cv2.erode(inner, np.ones((2 * edge, 2 * edge), np.uint8))
    return cv2.GaussianBlur(centre, (2 * edge + 1, 2 * edge + 1), 0).astype(np.float32)


def paste_faces(images: np.ndarray, crops: np.ndarray, alignment: Alignment, alpha: np.ndarray | None = None,
                soft: bool = True) -> np.ndarray:
    """Put restored crops (N, size, size, 3) back into ``images`` (N, H, W, 3); ``alpha`` (N, H, W) limits the
    pasted region further (the head). Images whose alignment is unusable come back unchanged."""
    import cv2

    out = np.array(images, np.uint8, copy=True)
    height, width = out.shape[1:3]
    for i in np.flatnonzero(alignment.usable):
        inverse = alignment.inverse[i]
        back = cv2.warpAffine(np.ascontiguousarray(crops[i]), inverse, (width, height), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32)
        mask = paste_mask(inverse, alignment.size, height, width, soft)
        if alpha is not None:
            mask = mask * np.clip(alpha[i], 0.0, 1.0)
        mask = mask[..., None]
        blended = mask * back + (1.0 - mask) * out[i].astype(np.float32)
        out[i] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out
