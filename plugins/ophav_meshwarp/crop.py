"""The square crop of the portrait that the video shows: the face with room for hair, ears and shoulders."""
from __future__ import annotations

import numpy as np


def crop_box(face_points: np.ndarray, image_size: tuple[int, int], scale: float, shift_up: float,
             min_scale: float | None = None) -> np.ndarray:
    """Square box ``[x0, y0, x1, y1]`` (float, portrait pixels, may leave the image) around the face.

    face_points: (V, 2) the tracked face mesh in the portrait. The box's side is ``scale`` times the face's
    larger extent; its centre is the face's centre moved up by ``shift_up`` of the side (more hair than neck).
    With ``min_scale``, a box that would leave the image first shrinks (down to ``min_scale`` times the face)
    and then slides (keeping the face inside) to stay within it: padding shows as streaks.
    """
    lo, hi = face_points.min(axis=0), face_points.max(axis=0)
    extent = float(max(hi - lo))
    side = max(float(scale * extent), 8.0)
    centre = (lo + hi) / 2.0
    centre[1] -= shift_up * side
    if min_scale is not None:
        side = max(min(side, float(min(image_size))), min_scale * extent, 8.0)
        centre = (lo + hi) / 2.0
        centre[1] -= shift_up * side
        margin = 0.05 * extent
        for axis in (0, 1):
            start = centre[axis] - side / 2
            # Keep the face inside the box, then the box inside the image where both are possible.
            face_lo, face_hi = hi[axis] + margin - side, lo[axis] - margin
            image_lo, image_hi = 0.0, image_size[axis] - side
            low, high = max(face_lo, image_lo), min(face_hi, image_hi)
            if low <= high:
                start = float(np.clip(start, low, high))
            else:
                start = float(np.clip(start, face_lo, face_hi))
            centre[axis] = start + side / 2
    return np.array([centre[0] - side / 2, centre[1] - side / 2, centre[0] + side / 2, centre[1] + side / 2])


def crop_image(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The ``box`` of ``image`` resized to ``size`` x ``size``; outside the image, edges are replicated."""
    import cv2

    x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
    side = max(1, int(round(box[2] - box[0])))
    h, w = image.shape[:2]
    pad = (max(0, -y0), max(0, y0 + side - h), max(0, -x0), max(0, x0 + side - w))
    padded = cv2.copyMakeBorder(image, *pad, cv2.BORDER_REPLICATE) if any(pad) else image
    top, left = y0 + pad[0], x0 + pad[2]
    region = padded[top:top + side, left:left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(region, (size, size), interpolation=interp))


def integer_box(box: np.ndarray) -> np.ndarray:
    """The box :func:`crop_image` actually cuts (integer corners)."""
    x0, y0 = np.floor(box[0]), np.floor(box[1])
    side = max(1, round(box[2] - box[0]))
    return np.array([x0, y0, x0 + side, y0 + side], np.float32)
