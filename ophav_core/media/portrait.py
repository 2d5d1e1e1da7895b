"""The one way pictures enter ophav: a portrait, or the frames of an image folder.

Checks come before decoding: the file's size on disk, then its width and height from the header (Pillow reads
only the header on open), so a small file that claims 60000x60000 pixels is refused before a byte of it is
decompressed. Then the picture is decoded with Pillow and made 8-bit RGB:

- EXIF orientation is applied (a phone's portrait shot stored sideways comes out upright);
- alpha is composited over white (a cut-out portrait reads as a studio photo; the colour under fully
  transparent pixels is arbitrary, so dropping alpha could show garbage);
- 16-bit and 32-bit greyscale is scaled to 8 bits (Pillow's own conversion clips instead);
- CMYK, palette, greyscale and every other mode go through Pillow's conversion to RGB;
- a truncated file is read as far as it goes, with a warning (a JPEG missing only its last bytes is common).

Pillow and NumPy's image arrays are imported inside the functions: ``import ophav_core`` stays light.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ophav_core.errors import UsageError
from ophav_core.stages.data import Portrait

# A 9000x9000 photo (81 megapixels) is read; a decoded 100-megapixel RGB image already takes 300 MB.
MAX_MEGAPIXELS = 100
# Larger than any compressed photo of MAX_MEGAPIXELS; an uncompressed 100-megapixel TIFF is 300 MB.
MAX_FILE_MB = 512
MIN_SIDE = 32  # what a Portrait holds at least
FORMATS = "PNG, JPEG, BMP, WebP or TIFF"


def read_portrait(path: str | os.PathLike, what: str = "portrait") -> Portrait:
    """The picture at ``path`` as a Portrait (uint8 RGB), or a UsageError naming the file and the problem.

    what: the word messages use for the picture ("portrait", "frame")."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    size = _file_size(path, what)
    if size == 0:
        raise UsageError(f"{path} is empty")
    if size > MAX_FILE_MB * 2**20:
        raise UsageError(f"{path} is {size / 2**20:.0f} MB; the largest {what} file ophav reads is {MAX_FILE_MB} MB")
    try:
        with _without_pillow_pixel_limit():
            image = Image.open(path)  # reads the header only
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image that can be read ({FORMATS})") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with image:
        width, height = image.size
        if width * height > MAX_MEGAPIXELS * 1_000_000:
            raise UsageError(f"{path} is {width}x{height}; the largest {what} ophav reads is {MAX_MEGAPIXELS} "
                             f"megapixels")
        if min(width, height) < MIN_SIDE:
            raise UsageError(f"{path} is {width}x{height}; the smallest {what} ophav reads is {MIN_SIDE}x{MIN_SIDE}")
        _decode(image, path)
        rgb = _to_rgb8(_upright(image))
    return Portrait(rgb, source=str(path))


def _file_size(path: Path, what: str) -> int:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not an image file")
    try:
        with open(path, "rb"):  # a file we may not read fails here with the reason, not later inside Pillow
            pass
        return path.stat().st_size
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@contextmanager
def _without_pillow_pixel_limit():
    """Pillow warns above 89 megapixels and refuses above 179 while opening, before we can see the size; our
    own limit (checked right after the header is read) replaces its decompression-bomb check."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode(image, path: Path) -> None:
    """Decode the pixels; a truncated file is decoded as far as it goes, with a warning."""
    from PIL import ImageFile

    try:
        image.load()
        return
    except OSError as exc:
        if "truncated" not in str(exc):
            raise UsageError(f"{path} is damaged and cannot be decoded: {exc}") from None
    except (SyntaxError, ValueError) as exc:  # Pillow's plugins raise these on malformed headers and chunks
        raise UsageError(f"{path} is damaged and cannot be decoded: {exc}") from None
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{path} is truncated and cannot be decoded: {exc}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    warnings.warn(f"{path} is truncated (the file ends before the image does); reading the part that is there",
                  stacklevel=3)


def _upright(image):
    """The image turned as its EXIF orientation says (a no-op without one)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image) or image


def _to_rgb8(image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any Pillow mode."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, np.float64)
        top = float(values.max()) if values.size else 0.0
        # 16-bit data (0..65535) is scaled down; "I"/"F" pictures already within 0..255 (or 0..1) keep their range.
        scale = 255.0 / 65535.0 if top > 255 else (255.0 if image.mode == "F" and top <= 1.0 else 1.0)
        grey = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.ascontiguousarray(np.asarray(Image.alpha_composite(white, rgba).convert("RGB")))
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def rotate_quarter_turns(portrait: Portrait, turns: int) -> Portrait:
    """The portrait turned by ``turns`` quarter turns counter-clockwise (as it would look on a screen)."""
    turns %= 4
    if turns == 0:
        return portrait
    return Portrait(np.ascontiguousarray(np.rot90(portrait.image, turns)), source=portrait.source)


def in_plane_tilt(rotation: np.ndarray) -> float:
    """Degrees the head is turned in the image plane (0 upright; positive: its top turned to the image's left,
    as in a photo stored turned 90 degrees counter-clockwise). From a head->camera rotation, camera y down."""
    R = np.asarray(rotation, np.float64).reshape(3, 3)
    return float(np.degrees(np.arctan2(R[0, 1], R[1, 1])))


def track_upright(portrait: Portrait, track, source: str = "") -> tuple[Portrait, object, int]:
    """The portrait turned upright (by quarter turns) and its tracking, for photos stored sideways or upside
    down without an EXIF orientation.

    track: portrait -> Tracking (one image), raising NoFaceFound. A face found tilted by more than 45 degrees
    is turned by the quarter turns that undo the tilt. Without a face as stored, the sideways turns are tried,
    then upside down (last: a face-mesh fit on an upside-down face can look upright). Warns which turn was
    used; returns (portrait, tracking, quarter turns counter-clockwise). Without a face at any turn, the
    tracker's NoFaceFound for the portrait as stored is raised."""
    from ophav_core.errors import NoFaceFound

    def tracked(turns: int):
        turned = rotate_quarter_turns(portrait, turns)
        return turned, track(turned), turns % 4

    def upright(found):
        """A tilted face turned by the quarter turns that undo the tilt, when the tracker agrees."""
        tilt = in_plane_tilt(found[1].rotation[0])
        if abs(tilt) <= 45:
            return found
        try:
            again = tracked(found[2] + int(round(-tilt / 90)))
        except NoFaceFound:
            return found  # a tilted face is still a face
        return again if abs(in_plane_tilt(again[1].rotation[0])) <= 45 else found

    try:
        found = upright(tracked(0))
    except NoFaceFound as as_stored:
        for turns in (1, 3, 2):
            try:
                found = upright(tracked(turns))
                break
            except NoFaceFound:
                continue
        else:
            raise as_stored
    turned, tracking, turns = found
    if turns:
        how = {1: "90 degrees counter-clockwise", 2: "upside down (180 degrees)", 3: "90 degrees clockwise"}[turns]
        warnings.warn(f"{source or portrait.source or 'the portrait'}: the face is upright with the picture turned "
                      f"{how}; using it turned (turn the file, or set its EXIF orientation, to silence this)",
                      stacklevel=2)
    return turned, tracking, turns
