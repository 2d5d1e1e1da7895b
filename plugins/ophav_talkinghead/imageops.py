"""Image plumbing shared by the talking-head components: square crops, uint8 <-> tensors, resizing."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NETWORK_SIZE = 256  # both public models were trained on 256x256 VoxCeleb crops


def square_region(height: int, width: int, crop: str = "center",
                  face_box: tuple[float, float, float, float] | None = None,
                  margin: float = 0.4) -> tuple[int, int, int]:
    """(x0, y0, side) of the square to cut from an image; it may reach outside the image (padded later)."""
    if face_box is not None:
        x0, y0, x1, y1 = face_box
        if not (x1 > x0 and y1 > y0):
            from ophav_core.errors import UsageError

            raise UsageError(f"face_box {tuple(face_box)} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        side_px = max(2, int(round(side)))
        return int(round(cx - side_px / 2.0)), int(round(cy - side_px / 2.0)), side_px
    side = min(height, width) if crop == "center" else max(height, width)
    return (width - side) // 2, (height - side) // 2, side


def cut_square(image: np.ndarray, region: tuple[int, int, int]) -> np.ndarray:
    """The square ``region`` of ``image`` (H, W, 3), edge-padded where it leaves the image."""
    x0, y0, side = region
    h, w = image.shape[:2]
    pad = ((max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)), (0, 0))
    if any(p for pair in pad[:2] for p in pair):
        image = np.pad(image, pad, mode="edge")
        x0, y0 = x0 + pad[1][0], y0 + pad[0][0]
    return image[y0:y0 + side, x0:x0 + side]


def to_network(images: np.ndarray, device: torch.device | str, size: int = NETWORK_SIZE) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, size, size) in [0, 1] on ``device`` (anti-aliased resize)."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return resize(tensor, size)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_uint8(images: torch.Tensor, size: int) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, size, size, 3) on the CPU."""
    images = resize(images.float(), size).clamp(0.0, 1.0)
    return (images * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def frame_indices(num_source: int, num_wanted: int) -> np.ndarray:
    """Indices into a driving video of ``num_source`` frames for an output of ``num_wanted`` frames."""
    if num_source == num_wanted:
        return np.arange(num_wanted)
    return np.rint(np.linspace(0, num_source - 1, num_wanted)).astype(np.int64)


def batches(total: int, batch_size: int):
    for start in range(0, total, batch_size):
        yield slice(start, min(total, start + batch_size))
