"""The paper's metrics (its Table 1) as metric plugins: PSNR, SSIM (scikit-image), LPIPS (the ``lpips`` package,
AlexNet trunk), FID (torch-fidelity's InceptionV3 port of the TensorFlow FID network), CSIM (cosine similarity of
ArcFace embeddings, insightface ``arcface_torch`` IResNet) and AED, APD, AKD (expression, head pose and keypoint
transfer, measured with the run's tracker).

Networks with public weights (LPIPS trunk, Inception, ArcFace) take them from the weight store
(:data:`METRIC_WEIGHTS`, declared by this package's ``register_weights`` hook); a missing file makes the metric
n/a with the store's message, never a made-up number. Heavy modules (torch, skimage, cv2) load inside functions.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ophav_core.errors import InvalidData, NoFaceFound
from ophav_core.stages.data import FrameSet, Tracking
from ophav_core.stages.metric import MetricInputs
from ophav_core.weights import WeightFile

AKD_WIDTH = 256  # keypoint distances are reported in pixels of an image this wide
PSNR_CAP = 100.0  # identical images count as 100 dB (keeps the JSON finite)

LPIPS_ALEXNET = WeightFile(
    name="lpips-alexnet", filename="alexnet-owt-7be5be79.pth",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    license="BSD-3-Clause (torchvision)", needed_by="LPIPS (ophav eval, metric plugin ophav_metrics)",
    description="torchvision's ImageNet AlexNet; LPIPS uses its convolutional trunk (the linear heads ship with "
                "the lpips package)",
    verify="ophav_metrics.paper:verify_alexnet")
FID_INCEPTION = WeightFile(
    name="fid-inception", filename="weights-inception-2015-12-05-6726825d.pth",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    license="Apache-2.0", needed_by="FID (ophav eval, metric plugin ophav_metrics)",
    description="TensorFlow's 2015-12-05 Inception (the FID network) converted to PyTorch by torch-fidelity",
    verify="ophav_metrics.paper:verify_inception")
ARCFACE_R100 = WeightFile(
    name="arcface-r100", filename="ms1mv3_arcface_r100_fp16_backbone.pth",
    url="https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo",
    license="insightface model zoo: non-commercial research use only", restricted=True,
    needed_by="CSIM (ophav eval, metric plugin ophav_metrics)",
    description="arcface_torch ms1mv3_arcface_r100_fp16/backbone.pth (download it from the model zoo page and "
                "`ophav weights add arcface-r100 backbone.pth`); r18/r34/r50 backbones load as well",
    verify="ophav_metrics.paper:verify_arcface")
METRIC_WEIGHTS: dict[str, WeightFile] = {w.name: w for w in (LPIPS_ALEXNET, FID_INCEPTION, ARCFACE_R100)}




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


# ---------------------------------------------------------------------------------------------- as metrics
# Each takes the protocol's MetricInputs (see ophav_core.study.metrics.INPUTS) and returns per-render values.


def compute_psnr(inputs: MetricInputs) -> np.ndarray:
    return psnr(inputs.pred, inputs.get("target"), inputs.get("region"))


def compute_ssim(inputs: MetricInputs) -> np.ndarray:
    return ssim(inputs.pred, inputs.get("target"), inputs.get("region"))


def compute_lpips(inputs: MetricInputs) -> np.ndarray:
    return lpips_distance(inputs.pred, inputs.get("target"), inputs.get("device", "cpu"))


def compute_fid(inputs: MetricInputs) -> float:
    return fid(inputs.pred, inputs.get("real_heads"), inputs.get("device", "cpu"))


def compute_csim(inputs: MetricInputs) -> np.ndarray:
    render_landmarks = inputs.get("render_tracking").landmarks5()
    images, landmarks = inputs.get("identity_reference")
    return csim(inputs.pred, render_landmarks, images, landmarks, device=inputs.get("device", "cpu"))


def _tracked_pair(inputs: MetricInputs) -> tuple[Tracking, Tracking, np.ndarray]:
    """The renders tracked by the run's tracker in the avatar's basis, and the frames' tracking, on the frames
    where both found a face (shared by AED, APD and AKD through ``inputs.cache``)."""
    if "paper.tracked" not in inputs.cache:
        tracker, template = inputs.get("tracker"), inputs.get("template")
        reference = inputs.get("reference_tracking")
        fps = float(inputs.get("fps", 25.0))
        try:
            tracked = tracker.track(FrameSet(inputs.pred, fps=fps), reference=template, source="the renders")
        except NoFaceFound as exc:
            inputs.cache["paper.tracked"] = NoFaceFound(f"the tracker found no face in the renders ({exc})")
        else:
            keep = _both_valid(tracked, reference)
            inputs.cache["paper.tracked"] = (tracked, reference, keep) if keep.any() else \
                NoFaceFound("the tracker found no face in the renders")
    value = inputs.cache["paper.tracked"]
    if isinstance(value, Exception):
        raise value
    tracked, reference, keep = value
    return tracked, reference, keep


def _transfer(inputs: MetricInputs, distance) -> np.ndarray:
    """Per-render values of ``distance`` (NaN where a side has no face, so those frames are counted as missing)."""
    tracked, reference, keep = _tracked_pair(inputs)
    index = np.flatnonzero(keep)
    out = np.full(len(inputs), np.nan)
    out[index] = distance(tracked.subset(index), reference.subset(index))
    return out


def compute_aed(inputs: MetricInputs) -> np.ndarray:
    return _transfer(inputs, expression_distance)


def compute_apd(inputs: MetricInputs) -> np.ndarray:
    return _transfer(inputs, pose_distance)


def compute_akd(inputs: MetricInputs) -> np.ndarray:
    return _transfer(inputs, keypoint_distance)
