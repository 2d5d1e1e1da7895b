"""The paper's metrics and the two evaluation protocols behind ``ophav eval`` (the layout of its Table 1).

Metrics (each a mean over the compared frames; ``None`` with a reason when it cannot be computed honestly):

* PSNR, SSIM (scikit-image), LPIPS (the ``lpips`` package, AlexNet trunk): visual quality against ground truth.
* FID (torch-fidelity's InceptionV3 port of the TensorFlow FID network): realism of the set of renders.
* CSIM: cosine similarity of ArcFace embeddings (insightface ``arcface_torch`` IResNet): identity.
* AED, APD, AKD: expression, head pose and keypoint transfer, measured with the run's tracker.

Networks with public weights (LPIPS trunk, Inception, ArcFace) take them from the weight store
(:data:`METRIC_WEIGHTS`, registered by this module's ``register_weights`` hook); a missing file makes the
metric ``None`` with the store's message, never a made-up number.

Protocols:

* :func:`self_reenactment`: the avatar is rendered at the tracked parameters of held-out frames (every Nth
  frame of a dataset, the frames ``ophav fit --holdout N`` leaves out, or of a run's coarse video) and compared
  with those frames.
* :func:`cross_reenactment`: the avatar is driven by another person's video; expression, pose and keypoints are
  compared with the driver, identity with the portrait, and FID against the driver's (matted) frames.

This module imports nothing heavy at import time (it is also the plugin that declares the metric weights).
"""
from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ophav_core import __version__, hookimpl
from ophav_core.errors import InvalidData, NoFaceFound, UsageError, WeightsMissing
from ophav_core.stages.data import FrameSet, MaskSet, Portrait, RenderRequest, RenderResult, Tracking
from ophav_core.weights import WeightFile

# ---------------------------------------------------------------------------------------------- what is measured

METRICS = ("psnr", "ssim", "lpips", "fid", "csim", "aed", "apd", "akd")
HEADERS = {"psnr": "PSNR↑", "ssim": "SSIM↑", "lpips": "LPIPS↓", "fid": "FID↓", "csim": "CSIM↑", "aed": "AED↓",
           "apd": "APD↓", "akd": "AKD↓"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "csim": True, "aed": False,
                    "apd": False, "akd": False}
DECIMALS = {"psnr": 2, "ssim": 4, "lpips": 4, "fid": 2, "csim": 4, "aed": 4, "apd": 2, "akd": 2}
AKD_WIDTH = 256  # keypoint distances are reported in pixels of an image this wide
PSNR_CAP = 100.0  # identical images count as 100 dB (keeps the JSON finite)

DEFINITIONS = {
    "psnr": "dB, data range 255, over the head region (union of the frame's mask and the render's alpha); both "
            "images composited on black",
    "ssim": "scikit-image SSIM (Gaussian window sigma 1.5, population covariance, data range 255), the SSIM map "
            "averaged over the head region less a 5-pixel border",
    "lpips": "LPIPS v0.1 with the AlexNet trunk, on the images composited on black, inputs in [-1, 1]",
    "fid": "Frechet distance of InceptionV3 pool features (2048-d, torch-fidelity's port of the TF FID network) "
           "between the renders and the real frames, composited on black; unstable below a few hundred images",
    "csim": "cosine similarity of ArcFace (IResNet, 512-d) embeddings of 112x112 crops aligned on the 5 landmarks",
    "aed": "mean absolute difference of expression coefficients (tracker's basis, the avatar's template), both "
           "sides tracked by the same tracker",
    "apd": "mean geodesic angle in degrees between the tracked head rotations",
    "akd": f"mean distance in pixels (at {AKD_WIDTH} pixels wide) of the 5 tracked landmarks (eyes, nose, mouth "
           "corners)",
}

# ---------------------------------------------------------------------------------------------- weights

LPIPS_ALEXNET = WeightFile(
    name="lpips-alexnet", filename="alexnet-owt-7be5be79.pth",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    license="BSD-3-Clause (torchvision)", needed_by="LPIPS (ophav eval)",
    description="torchvision's ImageNet AlexNet; LPIPS uses its convolutional trunk (the linear heads ship with "
                "the lpips package)",
    verify="ophav_core.study.evaluation:verify_alexnet")
FID_INCEPTION = WeightFile(
    name="fid-inception", filename="weights-inception-2015-12-05-6726825d.pth",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    license="Apache-2.0", needed_by="FID (ophav eval)",
    description="TensorFlow's 2015-12-05 Inception (the FID network) converted to PyTorch by torch-fidelity",
    verify="ophav_core.study.evaluation:verify_inception")
ARCFACE_R100 = WeightFile(
    name="arcface-r100", filename="ms1mv3_arcface_r100_fp16_backbone.pth",
    url="https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo",
    license="insightface model zoo: non-commercial research use only", restricted=True,
    needed_by="CSIM (ophav eval)",
    description="arcface_torch ms1mv3_arcface_r100_fp16/backbone.pth (download it from the model zoo page and "
                "`ophav weights add arcface-r100 backbone.pth`); r18/r34/r50 backbones load as well",
    verify="ophav_core.study.evaluation:verify_arcface")
METRIC_WEIGHTS: dict[str, WeightFile] = {w.name: w for w in (LPIPS_ALEXNET, FID_INCEPTION, ARCFACE_R100)}


@hookimpl
def register_weights(register) -> None:
    for weight in METRIC_WEIGHTS.values():
        register(weight)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """One avatar under one protocol: mean metrics, the reasons for missing ones, and what was compared.

    pred / target: the compared images (uint8, composited on black); target is None without ground truth.
    region: bool (N, H, W) the head region PSNR/SSIM use (None without ground truth)."""

    protocol: str
    label: str
    metrics: dict[str, float | None]
    missing: dict[str, str]
    per_frame: dict[str, list[float]]
    settings: dict[str, Any]
    pred: np.ndarray
    target: np.ndarray | None = None
    region: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ophav": __version__, "protocol": self.protocol, "label": self.label,
                "metrics": {k: self.metrics.get(k) for k in METRICS if k in self.metrics},
                "missing": self.missing, "definitions": {k: DEFINITIONS[k] for k in self.metrics},
                "settings": self.settings, "per_frame": self.per_frame}


PROTOCOL_TITLES = {"self": "Self-reenactment", "cross": "Cross-identity reenactment"}


def format_value(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{DECIMALS[metric]}f}"


def markdown_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Rows (``EvalResult.to_json()`` dicts) as the paper's Table 1: one row per method or avatar, columns
    PSNR↑ SSIM↑ LPIPS↓ FID↓ CSIM↑ AED↓ APD↓ AKD↓; a missing value reads n/a with its reason below."""
    protocols = sorted({row["protocol"] for row in rows})
    lines = [f"**{title or ' / '.join(PROTOCOL_TITLES.get(p, p) for p in protocols)}**", ""]
    with_protocol = len(protocols) > 1
    header = ["Method"] + (["Protocol"] if with_protocol else []) + [HEADERS[m] for m in METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + (["---"] if with_protocol else [])
                                                              + ["---:"] * len(METRICS)) + "|"]
    reasons: dict[str, str] = {}
    for row in rows:
        cells = [row["label"]] + ([PROTOCOL_TITLES.get(row["protocol"], row["protocol"])] if with_protocol else [])
        cells += [format_value(m, row["metrics"].get(m)) for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
        for metric, reason in row.get("missing", {}).items():
            reasons.setdefault(metric, reason)
    if reasons:
        lines += ["", "n/a:"] + [f"- {HEADERS[m]}: {_one_line(r)}" for m, r in reasons.items() if m in HEADERS]
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- images


def uncomposite(render: RenderResult) -> np.ndarray:
    """The renders over black: fields composite the head over a constant background of their choice; it is
    estimated per image from the pixels the head does not cover (alpha < 0.01) and taken out, so renders and
    matted frames are compared on the same (black) background."""
    rgb = render.rgb.astype(np.float32)
    alpha = render.alpha[..., None]
    out = np.empty_like(rgb)
    for i in range(len(rgb)):
        empty = render.alpha[i] < 0.01
        background = np.median(rgb[i][empty], axis=0) if empty.any() else np.zeros(3, np.float32)
        out[i] = rgb[i] - background * (1.0 - alpha[i])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def matte(frames: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Frames composited on black with their head alpha."""
    return np.clip(np.rint(frames.astype(np.float32) * alpha[..., None]), 0, 255).astype(np.uint8)


def head_region(target_alpha: np.ndarray, render_alpha: np.ndarray) -> np.ndarray:
    """Where either side shows the head: a render missing part of the head, or adding one, is penalised."""
    return (target_alpha > 0.5) | (render_alpha > 0.5)


# ---------------------------------------------------------------------------------------------- PSNR / SSIM

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5


def ssim_border() -> int:
    """Pixels at the border where scikit-image's SSIM map is unreliable (half its Gaussian window)."""
    return int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)


def psnr(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per-image PSNR (dB, data range 255) of uint8 (N, H, W, 3) images over ``region`` (N, H, W)."""
    from skimage.metrics import peak_signal_noise_ratio

    values = []
    for i in range(len(pred)):
        keep = np.ones(pred.shape[1:3], bool) if region is None else region[i]
        if not keep.any():
            values.append(float("nan"))
            continue
        a, b = target[i][keep], pred[i][keep]
        if np.array_equal(a, b):
            values.append(PSNR_CAP)
            continue
        values.append(min(PSNR_CAP, float(peak_signal_noise_ratio(a, b, data_range=255))))
    return np.asarray(values, np.float64)


def ssim(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per-image SSIM: scikit-image's SSIM map (Wang et al.'s settings) averaged over ``region`` less the
    border; with no region it equals scikit-image's mean SSIM."""
    from skimage.metrics import structural_similarity

    border = ssim_border()
    values = []
    for i in range(len(pred)):
        _, ssim_map = structural_similarity(target[i], pred[i], channel_axis=-1, data_range=255, full=True,
                                            gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False)
        keep = np.zeros(pred.shape[1:3], bool)
        keep[border:-border or None, border:-border or None] = True
        if region is not None:
            keep &= region[i]
        values.append(float(ssim_map[keep].mean()) if keep.any() else float("nan"))
    return np.asarray(values, np.float64)


# ---------------------------------------------------------------------------------------------- networks


def _to_tensor(images: np.ndarray, device: str):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)


def _safe_load(path: Path) -> dict[str, Any]:
    from ophav_core.weights import load_tensors

    state = load_tensors(path, what="a state dict")
    if not isinstance(state, dict):
        raise InvalidData(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def _require(weight: WeightFile, explicit: str | os.PathLike | None = None) -> Path:
    from ophav_core.weights import require

    return require(weight, explicit)


@lru_cache(maxsize=4)
def _lpips_model(path: str, device: str):
    import lpips
    import torchvision

    with warnings.catch_warnings():  # lpips builds its random trunk through torchvision's deprecated argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    trunk = torchvision.models.alexnet(weights=None)
    trunk.load_state_dict(_safe_load(Path(path)), strict=True)
    for slice_ in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
        for index, module in slice_.named_children():
            module.load_state_dict(trunk.features[int(index)].state_dict())
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    head_state = _safe_load(heads)
    expected = {k for k in model.state_dict() if k.startswith("lin") and not k.startswith("lins.")}
    if set(head_state) != expected:  # `lins.N` are the same tensors as `linN`
        raise InvalidData(f"{heads}: the lpips package's linear heads do not match ({sorted(head_state)} vs "
                          f"{sorted(expected)})")
    model.load_state_dict(head_state, strict=False)
    return model.eval().to(device)


def verify_alexnet(path: Path) -> None:
    import torchvision

    torchvision.models.alexnet(weights=None).load_state_dict(_safe_load(path), strict=True)


def lpips_distance(pred: np.ndarray, target: np.ndarray, device: str = "cpu", weights: str | None = None,
                   batch: int = 8) -> np.ndarray:
    """Per-image LPIPS (AlexNet) of uint8 images."""
    path = _require(LPIPS_ALEXNET, weights)
    import torch

    model = _lpips_model(str(path), device)
    out = []
    with torch.no_grad():
        for start in range(0, len(pred), batch):
            a = _to_tensor(pred[start:start + batch], device).float() / 127.5 - 1.0
            b = _to_tensor(target[start:start + batch], device).float() / 127.5 - 1.0
            out.append(model(a, b).reshape(-1).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch-fidelity calls ``torch.load(path, weights_only=False)``; torch's own switch makes every load in
    this block a restricted (weights-only) one, so a checkpoint can never run code."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


@lru_cache(maxsize=2)
def _inception(path: str, device: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with _weights_only_loads():
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    return model.eval().to(device)


def verify_inception(path: Path) -> None:
    _inception.__wrapped__(str(path), "cpu")


def inception_features(images: np.ndarray, device: str = "cpu", weights: str | None = None,
                       batch: int = 16) -> np.ndarray:
    path = _require(FID_INCEPTION, weights)
    import torch

    model = _inception(str(path), device)
    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            out = model(_to_tensor(images[start:start + batch], device))
            feats.append((out[0] if isinstance(out, (tuple, list)) else out).double().cpu().numpy())
    return np.concatenate(feats)


def fid(pred: np.ndarray, target: np.ndarray, device: str = "cpu", weights: str | None = None) -> float:
    """FID between two sets of uint8 images (torch-fidelity's statistics and distance)."""
    if len(pred) < 2 or len(target) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(pred)} and {len(target)}")
    weights = str(_require(FID_INCEPTION, weights))  # before importing torch: a missing file is reported fast
    import torch
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(torch.from_numpy(inception_features(x, device, weights)))
             for x in (pred, target)]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


# ---------------------------------------------------------------------------------------------- ArcFace

#: insightface's ``arcface_dst``: the 112x112 crop ArcFace was trained on (image-left eye first).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
#: template index -> ``Tracking.landmarks5`` index (the subject's right eye is on the image left).
SUBJECT_TO_TEMPLATE = (1, 0, 2, 4, 3)
IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


@lru_cache(maxsize=1)
def _iresnet_class():
    """arcface_torch's IResNet (``backbones/iresnet.py``) with the same module names, so its ``backbone.pth``
    files load strictly. Built on first use so that importing this module does not import torch."""
    import torch
    from torch import nn

    class IBasicBlock(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
            self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))

    class IResNet(nn.Module):
        def __init__(self, layers: Sequence[int], num_features: int = 512):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
            self.prelu = nn.PReLU(64)
            inplanes = 64
            for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False),
                                           nn.BatchNorm2d(planes, eps=1e-5))
                stage = [IBasicBlock(inplanes, planes, 2, downsample)]
                stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
                setattr(self, f"layer{i}", nn.Sequential(*stage))
                inplanes = planes
            self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
            self.dropout = nn.Dropout(p=0.0)
            self.fc = nn.Linear(512 * 7 * 7, num_features)
            self.features = nn.BatchNorm1d(num_features, eps=1e-5)

        def forward(self, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
            return self.features(self.fc(x))

    return IResNet


def iresnet_layers_from_state(state: dict[str, Any]) -> tuple[int, int, int, int]:
    """Blocks per stage of an arcface_torch backbone, read from its keys (r18, r34, r50 and r100 all load)."""
    counts = []
    for stage in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")}
        if not blocks:
            raise InvalidData(f"not an arcface_torch IResNet backbone: no layer{stage}.* keys")
        counts.append(max(blocks) + 1)
    return tuple(counts)  # type: ignore[return-value]


def load_arcface(path: Path, device: str = "cpu"):
    """An ArcFace backbone from an arcface_torch ``backbone.pth`` (a raw state dict; fp16-trained files are
    stored in float32 or float16 and are loaded as float32), strictly."""
    state = _safe_load(Path(path))
    model = _iresnet_class()(iresnet_layers_from_state(state))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval().to(device)


def verify_arcface(path: Path) -> None:
    load_arcface(path)


@lru_cache(maxsize=2)
def _arcface(path: str, device: str):
    return load_arcface(Path(path), device)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity transform taking ``src`` points onto ``dst`` (Umeyama, scikit-image)."""
    from skimage.transform import SimilarityTransform

    if hasattr(SimilarityTransform, "from_estimate"):
        transform = SimilarityTransform.from_estimate(src, dst)
        if not transform:
            raise InvalidData("the 5 landmarks are degenerate; no face alignment")
    else:  # scikit-image < 0.26
        transform = SimilarityTransform()
        if not transform.estimate(src, dst):
            raise InvalidData("the 5 landmarks are degenerate; no face alignment")
    return np.asarray(transform.params[:2], np.float64)


def align_arcface(images: np.ndarray, landmarks5: np.ndarray, size: int = 112) -> np.ndarray:
    """112x112 ArcFace crops of uint8 images from their 5 landmarks (``Tracking.landmarks5`` order)."""
    import cv2

    template = ARCFACE_TEMPLATE_112 * (size / 112.0)
    crops = np.zeros((len(images), size, size, 3), np.uint8)
    for i, (image, points) in enumerate(zip(images, landmarks5)):
        matrix = _similarity(np.asarray(points, np.float64)[list(SUBJECT_TO_TEMPLATE)], template)
        crops[i] = cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                                  borderValue=(0, 0, 0))
    return crops


def identity_embeddings(images: np.ndarray, landmarks5: np.ndarray, device: str = "cpu",
                        weights: str | None = None, batch: int = 16) -> np.ndarray:
    """L2-normalised ArcFace embeddings (N, 512) of faces in uint8 images."""
    path = _require(ARCFACE_R100, weights)
    import torch

    model = _arcface(str(path), device)
    crops = align_arcface(images, landmarks5)
    out = []
    with torch.no_grad():
        for start in range(0, len(crops), batch):
            x = (_to_tensor(crops[start:start + batch], device).float() / 255.0 - 0.5) / 0.5
            out.append(torch.nn.functional.normalize(model(x), dim=1).double().cpu().numpy())
    return np.concatenate(out)


def csim(pred: np.ndarray, pred_landmarks: np.ndarray, reference: np.ndarray, reference_landmarks: np.ndarray,
         device: str = "cpu", weights: str | None = None) -> np.ndarray:
    """Per-image cosine similarity of identities; ``reference`` is one image per prediction or a single one
    (the portrait) for all."""
    a = identity_embeddings(pred, pred_landmarks, device, weights)
    b = identity_embeddings(reference, reference_landmarks, device, weights)
    return (a * (b if len(b) == len(a) else np.repeat(b[:1], len(a), axis=0))).sum(axis=1)


# ---------------------------------------------------------------------------------------------- transfer


def expression_distance(a: Tracking, b: Tracking) -> np.ndarray:
    """AED per frame: mean absolute difference of the expression coefficients."""
    if a.expression.shape != b.expression.shape:
        raise InvalidData(f"expressions of different bases ({a.expression.shape} vs {b.expression.shape}); track "
                          f"both with reference= the avatar's template")
    return np.abs(a.expression - b.expression).mean(axis=1).astype(np.float64)


def pose_distance(a: Tracking, b: Tracking) -> np.ndarray:
    """APD per frame: geodesic angle (degrees) between the head rotations."""
    relative = np.einsum("nji,njk->nik", a.rotation.astype(np.float64), b.rotation.astype(np.float64))
    cos = np.clip((np.trace(relative, axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def keypoint_distance(a: Tracking, b: Tracking, width: int = AKD_WIDTH) -> np.ndarray:
    """AKD per frame: mean distance of the 5 landmarks, each side scaled to ``width`` pixels wide."""
    la = a.landmarks5() * (width / float(a.image_size[0]))
    lb = b.landmarks5() * (width / float(b.image_size[0]))
    return np.linalg.norm(la - lb, axis=-1).mean(axis=1).astype(np.float64)


def _both_valid(a: Tracking, b: Tracking) -> np.ndarray:
    keep = np.ones(len(a), bool)
    for t in (a, b):
        if t.valid is not None:
            keep &= t.valid
    return keep


# ---------------------------------------------------------------------------------------------- the protocols


@dataclass
class _Collector:
    """Runs each requested metric, keeping the per-frame values and why a metric could not be computed."""

    wanted: tuple[str, ...]
    metrics: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    per_frame: dict[str, list[float]] = field(default_factory=dict)

    def skip(self, name: str, reason: str) -> None:
        if name in self.wanted:
            self.metrics[name], self.missing[name] = None, reason

    def run(self, name: str, compute: Callable[[], Any]) -> None:
        if name not in self.wanted:
            return
        try:
            value = compute()
        except WeightsMissing as exc:
            self.skip(name, str(exc))
            return
        except ImportError as exc:
            self.skip(name, f"{exc.name or exc} is not installed (pip install 'ophav[eval]')")
            return
        except (InvalidData, NoFaceFound, ValueError) as exc:
            self.skip(name, f"{type(exc).__name__}: {exc}")
            return
        values = np.atleast_1d(np.asarray(value, np.float64))
        values = values[np.isfinite(values)]
        if values.size == 0:
            self.skip(name, "no frame could be compared (empty head region or no face tracked)")
            return
        if np.ndim(value) > 0:
            self.per_frame[name] = [round(float(v), 6) if np.isfinite(v) else None  # JSON has no NaN
                                    for v in np.asarray(value, np.float64)]
        self.metrics[name] = float(values.mean())


def parse_metrics(text: str | Sequence[str] | None) -> tuple[str, ...]:
    if text is None:
        return METRICS
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in items)


def same_basis(a: Tracking, b: Tracking) -> bool:
    """Whether two trackings share the canonical mesh and expression basis (one was made from the other)."""
    return (a.canonical_vertices.shape == b.canonical_vertices.shape
            and a.expression_basis.shape == b.expression_basis.shape
            and np.allclose(a.canonical_vertices, b.canonical_vertices, atol=1e-5)
            and np.allclose(a.expression_basis, b.expression_basis, atol=1e-5))


def _subset_frames(frames: FrameSet, index: np.ndarray, fps: float) -> FrameSet:
    return FrameSet(frames.frames[index], fps=fps, driving={k: v[index] for k, v in frames.driving.items()})


def _transfer_metrics(collect: _Collector, tracker, rendered: RenderResult, template: Tracking,
                      reference: Tracking, fps: float) -> None:
    """AED/APD/AKD: the renders tracked by the same tracker, in the avatar's basis, against ``reference``."""
    if not any(m in collect.wanted for m in ("aed", "apd", "akd")):
        return
    try:
        tracked = tracker.track(FrameSet(rendered.rgb, fps=fps), reference=template, source="the renders")
    except NoFaceFound as exc:
        for name in ("aed", "apd", "akd"):
            collect.skip(name, f"the tracker found no face in the renders ({exc})")
        return
    keep = _both_valid(tracked, reference)
    if not keep.any():
        for name in ("aed", "apd", "akd"):
            collect.skip(name, "the tracker found no face in the renders")
        return
    a, b = tracked.subset(np.flatnonzero(keep)), reference.subset(np.flatnonzero(keep))
    collect.run("aed", lambda: expression_distance(a, b))
    collect.run("apd", lambda: pose_distance(a, b))
    collect.run("akd", lambda: keypoint_distance(a, b))


def self_reenactment(field_component, tracker, avatar, frames: FrameSet, masks: MaskSet,
                     tracking: Tracking | None = None, *, every: int = 10, portrait: Portrait | None = None,
                     metrics: Sequence[str] = METRICS, device: str = "cpu", label: str = "",
                     max_frames: int | None = None) -> EvalResult:
    """Render the avatar at the tracked parameters of every ``every``-th frame and compare with the frames.

    tracking: the frames' tracking; used as it is when it shares the avatar's canonical mesh and basis (the
        avatar was trained on it), else the frames are tracked again into the avatar's basis.
    portrait: when given, CSIM compares each render with the portrait (identity against the person's photo)
        instead of with its frame."""
    from ophav_core.pipeline.animate import tracking_for_request

    masks.check_matches(frames)
    if every < 1:
        raise UsageError("--every must be at least 1")
    index = np.arange(0, len(frames), every)
    if max_frames:
        index = index[:max_frames]
    template = avatar.template
    fps = frames.fps / every
    held_out = _subset_frames(frames, index, fps)
    if tracking is not None and len(tracking) == len(frames) and same_basis(tracking, template):
        eval_tracking, source_tracking = tracking.subset(index), "the dataset's own"
    else:
        eval_tracking = tracker.track(held_out, reference=template, source="the held-out frames")
        source_tracking = "tracked again into the avatar's basis"
    eval_tracking.check_matches(held_out)
    request = RenderRequest.from_tracking(eval_tracking)
    rendered = field_component.render(avatar, request)
    pred = uncomposite(rendered)
    target = matte(held_out.frames, masks.alpha[index])
    region = head_region(masks.alpha[index], rendered.alpha)

    collect = _Collector(parse_metrics(metrics))
    collect.run("psnr", lambda: psnr(pred, target, region))
    collect.run("ssim", lambda: ssim(pred, target, region))
    collect.run("lpips", lambda: lpips_distance(pred, target, device))
    collect.run("fid", lambda: fid(pred, target, device))
    render_landmarks = tracking_for_request(template, request).landmarks5()
    if portrait is not None:
        collect.run("csim", lambda: csim(pred, render_landmarks, *_portrait_face(tracker, portrait, template),
                                         device=device))
    else:
        collect.run("csim", lambda: csim(pred, render_landmarks, target, eval_tracking.landmarks5(), device=device))
    if any(m in collect.wanted for m in ("aed", "apd", "akd")):
        try:
            reference = tracker.track(held_out, reference=template, source="the held-out frames")
        except NoFaceFound as exc:
            for name in ("aed", "apd", "akd"):
                collect.skip(name, f"the tracker found no face in the frames ({exc})")
        else:
            _transfer_metrics(collect, tracker, rendered, template, reference, fps)
    settings = {"frames": int(len(index)), "every": every, "frame_index": index.tolist(),
                "resolution": [int(s) for s in request.resolution], "tracking": source_tracking,
                "csim_reference": "portrait" if portrait is not None else "frames",
                "held_out": f"frames i % {every} == 0 (the frames `ophav fit --holdout {every}` leaves out)",
                "akd_width": AKD_WIDTH, "device": device}
    return EvalResult("self", label, collect.metrics, collect.missing, collect.per_frame, settings, pred, target,
                      region)


def _portrait_face(tracker, portrait: Portrait, template: Tracking) -> tuple[np.ndarray, np.ndarray]:
    tracked = tracker.track(FrameSet(portrait.image[None], fps=1.0), single_image=True, reference=template,
                            source=portrait.source or "the portrait")
    return portrait.image[None], tracked.landmarks5()


def cross_reenactment(field_component, tracker, avatar, driver: FrameSet, portrait: Portrait | None = None, *,
                      segmenter=None, metrics: Sequence[str] = METRICS, device: str = "cpu", label: str = "",
                      resolution: tuple[int, int] | None = None, driver_tracking: Tracking | None = None) -> EvalResult:
    """Drive the avatar with another person's video (relative motion from the driver's first frame, as
    ``ophav render --driver``); expression, pose and keypoints against the driver, identity against the
    portrait, FID against the driver's frames matted by ``segmenter``."""
    from ophav_core.pipeline.animate import requests_from_driver, tracking_for_request

    template = avatar.template
    if driver_tracking is None:
        driver_tracking = tracker.track(driver, reference=template, source="the driving video")
    driver_tracking.check_matches(driver)
    request = requests_from_driver(template, driver_tracking, resolution=resolution)
    rendered = field_component.render(avatar, request)
    pred = uncomposite(rendered)

    collect = _Collector(parse_metrics(metrics))
    for name in ("psnr", "ssim", "lpips"):
        collect.skip(name, "cross-identity reenactment has no ground-truth image")
    if segmenter is None:
        collect.skip("fid", "FID needs a segmenter to cut the driver's head out of its frames")
    else:
        def driver_fid() -> float:
            masks = segmenter.segment(driver, driver_tracking)
            real = matte(driver.frames, masks.alpha)
            return fid(pred, real, device)

        collect.run("fid", driver_fid)
    if portrait is None:
        collect.skip("csim", "no portrait to compare the identity with (give --portrait)")
    else:
        render_landmarks = tracking_for_request(template, request).landmarks5()
        collect.run("csim", lambda: csim(pred, render_landmarks, *_portrait_face(tracker, portrait, template),
                                         device=device))
    _transfer_metrics(collect, tracker, rendered, template, driver_tracking, driver.fps)
    settings = {"frames": len(driver), "resolution": [int(s) for s in request.resolution],
                "driving": "relative to the driver's first frame, applied to the avatar's most frontal frame",
                "apd_note": "absolute poses are compared; a driver whose first frame is not frontal adds a constant "
                            "offset", "akd_width": AKD_WIDTH, "device": device}
    return EvalResult("cross", label, collect.metrics, collect.missing, collect.per_frame, settings, pred)


# ---------------------------------------------------------------------------------------------- sources


def load_reference(folder: Path) -> tuple[FrameSet, MaskSet, Tracking, dict[str, Any]]:
    """Frames, masks and tracking of a dataset (``ophav preprocess``) or of a run directory (its coarse video)."""
    import json

    folder = Path(folder)
    if (folder / "dataset.json").is_file():
        meta = json.loads((folder / "dataset.json").read_text())
        names, kind = ("frames.npz", "masks.npz", "tracking.npz"), "dataset"
    elif (folder / "manifest.json").is_file():
        meta = json.loads((folder / "manifest.json").read_text())
        names, kind = ("image2video/frames.npz", "segment/masks.npz", "track/tracking.npz"), "run"
    else:
        raise UsageError(f"{folder} is neither a dataset (`ophav preprocess`) nor a run directory (`ophav run`)")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UsageError(f"{folder} lacks {', '.join(missing)} (an unfinished run or dataset?)")
    frames, masks, tracking = (FrameSet.load(folder / names[0]), MaskSet.load(folder / names[1]),
                               Tracking.load(folder / names[2]))
    masks.check_matches(frames)
    tracking.check_matches(frames)
    return frames, masks, tracking, {"kind": kind, **meta}


def write_outputs(out: Path, results: Sequence[EvalResult], extra: dict[str, Any] | None = None) -> str:
    """metrics.json, table.md and compare.png (renders above their frames) in ``out``; returns the table."""
    from ophav_core.media import contact_sheet, pick_evenly, save_png
    from ophav_core.pipeline.scheduler import write_json

    out.mkdir(parents=True, exist_ok=True)
    rows = [r.to_json() for r in results]
    table = markdown_table(rows)
    write_json(out / "metrics.json", {"results": rows, **(extra or {})})
    (out / "table.md").write_text(table)
    for i, result in enumerate(results):
        pick = pick_evenly(len(result.pred), 6)
        tiles = [result.pred[j] for j in pick]
        labels = [f"render #{j}" for j in pick]
        if result.target is not None:
            tiles += [result.target[j] for j in pick]
            labels += [f"frame #{j}" for j in pick]
        name = "compare.png" if len(results) == 1 else f"compare_{i}.png"
        save_png(out / name, contact_sheet(tiles, columns=len(pick), labels=labels))
    return table


__all__ = ["METRICS", "METRIC_WEIGHTS", "EvalResult", "self_reenactment", "cross_reenactment", "markdown_table",
           "psnr", "ssim", "lpips_distance", "fid", "csim", "load_arcface", "load_reference", "write_outputs",
           "verify_alexnet", "verify_inception", "verify_arcface"]
