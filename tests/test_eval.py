"""`ophav eval`: the metrics against independent computations, the protocols with the fake components, the
weight-store handling of the networks (randomly initialised checkpoints in the public formats)."""
import json
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from ophav_core.study import evaluation as ev
from ophav_metrics import paper
from ophav_core.config import build_config, resolve
from ophav_core.stages.motion import euler_to_matrix
from ophav_core.plugins import build_host
from ophav_core.pipeline.scheduler import Scheduler
from ophav_core.stages import RenderResult
from ophav_core.testing import fakes
from ophav_core.testing.fakes import FAKE_CONFIG, FakePlugin
from ophav_core.testing.synthetic import render_synthetic, synthetic_portrait, synthetic_tracking


def random_pair(n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    noise = rng.normal(0, 12, target.shape)
    pred = np.clip(target + noise, 0, 255).astype(np.uint8)
    return pred, target


# ---------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_and_ssim_agree_with_scikit_image_on_whole_images():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred, target = random_pair()
    for i, (p, s) in enumerate(zip(paper.psnr(pred, target), paper.ssim(pred, target))):
        assert p == pytest.approx(peak_signal_noise_ratio(target[i], pred[i], data_range=255), rel=1e-9)
        assert s == pytest.approx(structural_similarity(target[i], pred[i], channel_axis=-1, data_range=255,
                                                        gaussian_weights=True, sigma=1.5,
                                                        use_sample_covariance=False), rel=1e-9)


def test_masked_psnr_and_ssim_use_only_the_region():
    from skimage.metrics import structural_similarity

    pred, target = random_pair(2)
    region = np.zeros(pred.shape[:3], bool)
    region[:, 8:30, 5:25] = True
    pred_outside = pred.copy()
    pred_outside[~region] = 0  # changes outside the region must not matter
    expected = [10 * np.log10(255.0 ** 2 / np.mean((pred[i][region[i]].astype(float)
                                                     - target[i][region[i]].astype(float)) ** 2)) for i in range(2)]
    np.testing.assert_allclose(paper.psnr(pred_outside, target, region), expected, rtol=1e-9)
    _, full = structural_similarity(target[0], pred[0], channel_axis=-1, data_range=255, full=True,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert paper.ssim(pred, target, region)[0] == pytest.approx(full[region[0]].mean(), rel=1e-9)
    assert paper.psnr(target, target, region)[0] == paper.PSNR_CAP


def test_uncomposite_takes_out_a_constant_background():
    rng = np.random.default_rng(1)
    colour = rng.uniform(0, 255, (2, 24, 24, 3))
    alpha = np.zeros((2, 24, 24), np.float32)
    alpha[:, 4:20, 6:18] = 1.0
    alpha[:, 4:20, 5] = 0.5  # a soft edge
    white = colour * alpha[..., None] + 255.0 * (1 - alpha[..., None])
    render = RenderResult(np.rint(white).astype(np.uint8), alpha, alpha * 3)
    np.testing.assert_allclose(ev.uncomposite(render), colour * alpha[..., None], atol=1.01)


# ---------------------------------------------------------------------------------------------- transfer metrics


def test_pose_expression_and_keypoint_distances_have_known_values():
    a = synthetic_tracking(4, 64, max_yaw=0.0)
    b = synthetic_tracking(4, 64, max_yaw=0.0)
    turn = euler_to_matrix(np.array([0.0, 5.0, 10.0, 30.0]), np.zeros(4), np.zeros(4))
    b.rotation = (turn @ b.rotation).astype(np.float32)
    np.testing.assert_allclose(paper.pose_distance(a, b), [0, 5, 10, 30], atol=1e-3)
    b.expression = a.expression + np.array([0.0, 0.1, 0.2, 0.4], np.float32)[:, None]
    np.testing.assert_allclose(paper.expression_distance(a, b), [0, 0.1, 0.2, 0.4], atol=1e-6)
    shifted = synthetic_tracking(4, 64, max_yaw=0.0)
    shifted.K = shifted.K.copy()
    shifted.K[0, 2] += 2.0  # every projected point moves 2 pixels right at 64 pixels wide
    np.testing.assert_allclose(paper.keypoint_distance(a, shifted), 2.0 * paper.AKD_WIDTH / 64, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- protocols


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """A finished tiny run with the fake components, and the components themselves."""
    from ophav_core.media import save_png

    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "empty-store"))
    monkeypatch.delenv("OPHAV_FAKE_CRASH", raising=False)
    fakes.CALLS.clear()
    portrait = tmp_path / "portrait.png"
    save_png(portrait, synthetic_portrait(64).image)
    registry = build_host(extra_plugins=[("fakes", FakePlugin())], load_entry_points=False).registry
    flags = {k: v["name"] for k, v in FAKE_CONFIG.items()}
    flags.update(profile="tiny", rounds=1, device="cpu")
    scheduler = Scheduler(tmp_path / "run", resolve(build_config(None, flags, []), registry), portrait, quiet=True)
    result = scheduler.run()
    return scheduler, result, portrait


def test_self_reenactment_matches_an_independent_computation(fake_run):
    from skimage.metrics import peak_signal_noise_ratio

    scheduler, run, _ = fake_run
    field, tracker = scheduler.component("field"), scheduler.component("tracker")
    avatar = field.load(run.avatar)
    frames, masks, tracking, meta = ev.load_reference(run.run_dir)
    assert meta["kind"] == "run"
    result = ev.self_reenactment(field, tracker, avatar, frames, masks, tracking, every=3)

    index = np.arange(0, len(frames), 3)
    assert result.settings["frame_index"] == index.tolist() and result.settings["tracking"] == "the dataset's own"
    # Independently: render the same frames, composite both on black, PSNR over the head with scikit-image.
    from ophav_core.stages import RenderRequest

    rendered = field.render(avatar, RenderRequest.from_tracking(tracking, index))
    target = np.rint(frames.frames[index] * masks.alpha[index][..., None]).astype(np.uint8)
    pred = rendered.rgb  # the fake field renders over black
    region = (masks.alpha[index] > 0.5) | (rendered.alpha > 0.5)
    expected = np.mean([peak_signal_noise_ratio(target[i][region[i]], pred[i][region[i]], data_range=255)
                        for i in range(len(index))])
    assert result.metrics["psnr"] == pytest.approx(expected, rel=1e-9)
    assert 0.0 < result.metrics["ssim"] < 1.0
    for name in ("aed", "apd", "akd"):
        assert result.metrics[name] is not None and result.metrics[name] >= 0
    # Networks without weights: n/a with the store's message, never a number.
    for name, weight in (("lpips", paper.LPIPS_ALEXNET), ("fid", paper.FID_INCEPTION), ("csim", paper.ARCFACE_R100)):
        assert result.metrics[name] is None and weight.filename in result.missing[name]


def test_no_face_in_the_renders_makes_the_transfer_metrics_na(fake_run):
    from ophav_core.errors import NoFaceFound

    scheduler, run, _ = fake_run
    field, fake_tracker = scheduler.component("field"), scheduler.component("tracker")

    class BlindToRenders:  # like a real tracker facing a blurry, untrained avatar
        def track(self, frames, **kwargs):
            if kwargs.get("source") == "the renders":
                raise NoFaceFound("no face found in any of the frames of the renders")
            return fake_tracker.track(frames, **kwargs)

    frames, masks, tracking, _ = ev.load_reference(run.run_dir)
    result = ev.self_reenactment(field, BlindToRenders(), field.load(run.avatar), frames, masks, tracking, every=4,
                                 metrics=["psnr", "aed", "apd", "akd"])
    assert result.metrics["psnr"] is not None
    for name in ("aed", "apd", "akd"):
        assert result.metrics[name] is None and "no face" in result.missing[name]


def test_cross_reenactment_with_fakes(fake_run):
    scheduler, run, portrait_path = fake_run
    from ophav_core.media import read_image
    from ophav_core.stages.motion import default_script, motion_from_script

    field, tracker = scheduler.component("field"), scheduler.component("tracker")
    avatar = field.load(run.avatar)
    motion = motion_from_script(default_script(), fps=5, duration=1.2)
    driver = scheduler.component("image2video").generate(read_image(portrait_path), motion)
    result = ev.cross_reenactment(field, tracker, avatar, driver, read_image(portrait_path),
                                  segmenter=scheduler.component("segmenter"), metrics=["psnr", "fid", "csim", "apd"])
    assert set(result.metrics) == {"psnr", "fid", "csim", "apd"}
    assert result.metrics["psnr"] is None and "no ground-truth" in result.missing["psnr"]
    assert result.metrics["fid"] is None and paper.FID_INCEPTION.filename in result.missing["fid"]
    # The fake tracker takes the driver's yaw from the frames' driving data and finds none in the renders, so
    # APD (the geodesic angle between the two rotations) is the driver's mean absolute yaw.
    assert result.metrics["apd"] == pytest.approx(np.abs(motion.yaw).mean(), abs=1e-3)
    assert len(result.pred) == len(driver)


def test_markdown_table_has_the_paper_columns_and_reasons():
    rows = [{"protocol": "self", "label": "ours", "metrics": {"psnr": 30.123, "ssim": 0.91, "lpips": None},
             "missing": {"lpips": "weights file alexnet missing"}},
            {"protocol": "self", "label": "base", "metrics": {"psnr": 28.0}}]
    table = ev.markdown_table(rows)
    assert "| Method | PSNR↑ | SSIM↑ | LPIPS↓ |" in table  # the columns the rows carry, in the paper's order
    assert "| ours | 30.12 | 0.9100 | n/a |" in table and "| base | 28.00 | n/a | n/a |" in table
    assert "LPIPS↓: weights file alexnet missing" in table


# ---------------------------------------------------------------------------------------------- networks


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def test_lpips_loads_the_store_trunk_like_the_lpips_package(store, monkeypatch):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    trunk = torchvision.models.alexnet(weights=None)
    torch.save(trunk.state_dict(), store / paper.LPIPS_ALEXNET.filename)
    monkeypatch.setenv("OPHAV_WEIGHTS", str(store))
    paper.verify_alexnet(store / paper.LPIPS_ALEXNET.filename)
    pred, target = random_pair(2, 48)
    ours = paper.lpips_distance(pred, target)
    # The lpips package's own wiring, handed the same trunk instead of downloading one.
    with mock.patch.object(lpips.pretrained_networks.tv, "alexnet", lambda **kw: trunk):
        reference = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        to = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1  # noqa: E731
        expected = reference(to(pred), to(target)).reshape(-1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert np.allclose(paper.lpips_distance(target, target), 0.0, atol=1e-6)


def test_wrong_lpips_file_is_rejected(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError):
        paper.verify_alexnet(tmp_path / "bad.pth")


def _random_arcface(path, layers):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = paper._iresnet_class()(layers)
    for module in model.modules():  # non-trivial statistics so that the embedding depends on the image
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)


def test_arcface_public_key_layout_and_csim(store, monkeypatch):
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        r100 = paper._iresnet_class()(paper.IRESNET_LAYERS["r100"]).state_dict()
    # Names and shapes of arcface_torch's iresnet100 backbone.pth.
    for key, shape in {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "layer1.0.bn1.running_var": (64,),
                       "layer1.0.downsample.0.weight": (64, 64, 1, 1), "layer2.12.conv2.weight": (128, 128, 3, 3),
                       "layer3.29.prelu.weight": (256,), "layer4.2.bn3.weight": (512,), "bn2.num_batches_tracked": (),
                       "fc.weight": (512, 25088), "features.running_mean": (512,)}.items():
        assert tuple(r100[key].shape) == shape, key
    assert paper.iresnet_layers_from_state(r100) == (3, 13, 30, 3)
    assert not any("dropout" in k for k in r100)

    path = store / paper.ARCFACE_R100.filename
    _random_arcface(path, paper.IRESNET_LAYERS["r18"])  # a small public backbone (r18) keeps the test fast
    paper.verify_arcface(path)
    monkeypatch.setenv("OPHAV_WEIGHTS", str(store))
    tracking = synthetic_tracking(3, 64)
    images, _ = render_synthetic(tracking)
    same = paper.csim(images.frames, tracking.landmarks5(), images.frames, tracking.landmarks5())
    np.testing.assert_allclose(same, 1.0, atol=1e-5)
    other = paper.csim(images.frames, tracking.landmarks5(), images.frames[::-1], tracking.landmarks5()[::-1])
    assert (other < 0.9999).any() and (np.abs(other) <= 1 + 1e-6).all()


def test_face_alignment_puts_the_landmarks_on_the_arcface_template():
    import cv2

    tracking = synthetic_tracking(2, 96)
    landmarks = tracking.landmarks5()
    for i in range(2):
        matrix = paper._similarity(landmarks[i][list(paper.SUBJECT_TO_TEMPLATE)].astype(np.float64), paper.ARCFACE_TEMPLATE_112)
        moved = cv2.transform(landmarks[i][None].astype(np.float64), matrix)[0][list(paper.SUBJECT_TO_TEMPLATE)]
        # The image-left eye of the template is the subject's right eye.
        assert moved[0, 0] < moved[1, 0] and moved[3, 0] < moved[4, 0]
        assert np.abs(moved - paper.ARCFACE_TEMPLATE_112).max() < 8.0


def test_fid_uses_torch_fidelity_and_matches_scipy(monkeypatch, tmp_path):
    pytest.importorskip("torch_fidelity")
    from scipy import linalg

    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path))
    (tmp_path / paper.FID_INCEPTION.filename).write_bytes(b"stand-in: features are mocked below")
    rng = np.random.default_rng(0)
    table = {}

    def features(images, device="cpu", weights=None):  # deterministic 6-d "features" per image
        return np.stack([table.setdefault(im.tobytes(), rng.normal(size=6)) for im in images])

    monkeypatch.setattr(paper, "inception_features", features)
    pred, target = random_pair(12, 8)
    value = paper.fid(pred, target)
    fa, fb = features(pred), features(target)
    ma, mb, ca, cb = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    expected = np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert value == pytest.approx(expected, rel=1e-6)
    assert paper.fid(pred, pred) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        paper.fid(pred[:1], target)


@pytest.mark.slow
def test_inception_checkpoint_loads_strictly_and_gives_features(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None):
        model = fe.FeatureExtractorInceptionV3("random", ["2048"])
    state = model.state_dict()
    for key in state:  # keep activations alive through the random network
        if key.endswith("running_var"):
            state[key].fill_(0.15)
    torch.save(state, tmp_path / paper.FID_INCEPTION.filename)
    paper.verify_inception(tmp_path / paper.FID_INCEPTION.filename)
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path))
    feats = paper.inception_features(random_pair(2, 32)[0])
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.std() > 0
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError):
        paper.verify_inception(tmp_path / "bad.pth")


def test_metric_weights_are_declared_through_the_weights_hook():
    from ophav_metrics import plugin

    host = build_host(extra_plugins=[("metrics", plugin)], load_entry_points=False)
    assert set(paper.METRIC_WEIGHTS) <= set(host.weights)
    assert host.weights["arcface-r100"].restricted
    assert set(ev.PAPER_METRICS) <= set(host.metrics) and host.metrics["lpips"].weights == ("lpips-alexnet",)


def test_importing_the_study_modules_imports_no_torch():
    code = ("import sys, ophav_core.study.evaluation, ophav_core.study.metrics, ophav_core.study.ablate, "
            "ophav_core.cli.study, ophav_metrics.plugin, ophav_metrics.paper, ophav_metrics.offline; "
            "from ophav_core.plugins import get_host; get_host(); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lpips', 'torch_fidelity', 'ray', "
            "'matplotlib', 'cv2', 'skimage', 'dlib')]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- the command


def run_main(argv, capsys):
    from ophav_core.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


FAKES = ["--image2video", "fake", "--segmenter", "fake", "--tracker", "fake", "--field", "fake", "--restorer",
         "fake", "--profile", "tiny", "--device", "cpu", "-q"]


def test_eval_command_self_and_cross(fakes_env, portrait_file, tmp_path, capsys):
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES, "--rounds", "1"], capsys)
    assert code == 0, err
    avatar = str(tmp_path / "r/avatar/avatar.ckpt")
    code, out, err = run_main(["eval", avatar, "--dataset", str(tmp_path / "r"), "--every", "2", "--out",
                               str(tmp_path / "ev"), "-q"], capsys)
    assert code == 0, err
    assert "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | FID↓ | CSIM↑ | AED↓ | APD↓ | AKD↓ | ID dist↓ |" in out and "| r |" in out
    assert "detect↑" in out and "floaters↓" in out  # the offline metrics, after the paper's
    data = json.loads((tmp_path / "ev/metrics.json").read_text())
    row = data["results"][0]
    assert row["protocol"] == "self" and row["metrics"]["psnr"] > 0 and row["metrics"]["lpips"] is None
    assert (tmp_path / "ev/table.md").read_text() in out and (tmp_path / "ev/compare.png").is_file()

    from ophav_core.media import write_video
    from ophav_core.stages import FrameSet as Frames

    frames = Frames.load(tmp_path / "r/image2video/frames.npz")
    write_video(tmp_path / "driver.mp4", frames.frames, frames.fps)
    code, out, err = run_main(["eval", avatar, "--driver", str(tmp_path / "driver.mp4"), "--out",
                               str(tmp_path / "cross"), "--metrics", "psnr,csim,aed", "-q"], capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "cross/metrics.json").read_text())["results"][0]
    assert row["protocol"] == "cross" and set(row["metrics"]) == {"psnr", "csim", "aed"}
    assert row["metrics"]["aed"] is not None and "no ground-truth" in row["missing"]["psnr"]
    assert "Cross-identity" in out

    # Novel views of the same avatar (given as its run directory): the per-angle table and plot.
    code, out, err = run_main(["eval", str(tmp_path / "r"), "--views", "turntable", "--out", str(tmp_path / "v"),
                               "-q"], capsys)
    assert code == 0, err
    lines = [line for line in (tmp_path / "v/views.md").read_text().splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| yaw | pitch | ID dist↓ | no face↓ | detect↑ |") and len(lines) == 1 + 9 + 1
    assert [line.split("|")[1].strip() for line in lines[1:10]] == ["-60", "-45", "-30", "-15", "+0", "+15", "+30",
                                                                     "+45", "+60"]
    assert (tmp_path / "v/views.png").read_bytes()[:4] == b"\x89PNG" and "Novel views" in out
    row = json.loads((tmp_path / "v/metrics.json").read_text())["results"][0]
    assert row["protocol"] == "views" and row["settings"]["yaw"][0] == -60.0 and len(row["per_frame"]["floaters"]) == 9
    # The fake avatar is no face for dlib: identity is n/a with the reason, the detection rate a measured 0.
    assert row["metrics"]["identity"] is None and "no face" in row["missing"]["identity"]
    assert row["metrics"]["detect_rate"] == 0.0


@pytest.mark.parametrize("extra, message", [([], "give --dataset"), (["--metrics", "psnr,nope"], "unknown metric"),
                                            (["--label", "a", "--label", "b"], "2 --label"),
                                            (["--views", "sideways"], "turntable or grid")])
def test_eval_command_usage_errors_exit_2(fakes_env, tmp_path, capsys, extra, message):
    avatar = tmp_path / "a.ckpt"
    avatar.write_bytes(b"x")
    dataset = [] if message in ("give --dataset", "turntable or grid") else ["--dataset", str(tmp_path)]
    code, _, err = run_main(["eval", str(avatar), *dataset, "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and message in err
