"""face-vid2vid and FOMM (plugins/ophav_talkinghead): public checkpoint layouts, strict loading, generation.

No pretrained weights exist here. The full public architectures are built once each and checked against key
names and shapes read off the reference code and configs (first-order-model config/vox-256.yaml; the
face-vid2vid reimplementation's vox-256(-spade).yaml), then run once. Everything else uses small copies of the same
architectures (``model_params`` overrides) saved in the public wrapper format and loaded strictly from disk.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from ophav_core.errors import UsageError, WeightsMissing  # noqa: E402
from ophav_core.stages import FrameSet  # noqa: E402  (stages before motion: core import order)
from ophav_core.stages.motion import Motion  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import synthetic_portrait  # noqa: E402
from ophav_core.weights import verify  # noqa: E402
from ophav_talkinghead.checkpoints import CheckpointError  # noqa: E402
from ophav_talkinghead.expressions import expression_offsets  # noqa: E402
from ophav_talkinghead.facevid2vid import FaceVid2Vid  # noqa: E402
from ophav_talkinghead.fomm import FOMM  # noqa: E402
from ophav_talkinghead.fomm_net import build_fomm  # noqa: E402
from ophav_talkinghead.fv2v_net import (VOX_256, OcclusionAwareGenerator, bins_to_degrees,  # noqa: E402
                                        build_facevid2vid, posed_keypoints, rotation_matrix)
from ophav_talkinghead.layers import SpectralConv2d  # noqa: E402
from ophav_talkinghead.weights import FACEVID2VID_VOX, FOMM_VOX  # noqa: E402

# Small copies of the public architectures (every layer kind kept, channels and depth cut).
SMALL_FV2V = {
    "common_params": {"num_kp": 5, "feature_channel": 4},
    "kp_detector_params": {"block_expansion": 4, "max_features": 32, "reshape_channel": 128, "reshape_depth": 4},
    "he_estimator_params": {"block_expansion": 8, "max_features": 64},
    "generator_params": {"block_expansion": 4, "max_features": 16, "reshape_channel": 4, "reshape_depth": 4,
                         "num_resblocks": 1, "spade_hidden": 8,
                         "dense_motion_params": {"block_expansion": 4, "max_features": 16, "num_blocks": 3,
                                                 "reshape_depth": 4, "compress": 2}},
}
SMALL_FOMM = {
    "common_params": {"num_kp": 5},
    "kp_detector_params": {"block_expansion": 4, "max_features": 32},
    "generator_params": {"block_expansion": 8, "max_features": 32, "num_bottleneck_blocks": 1,
                         "dense_motion_params": {"block_expansion": 4, "max_features": 32, "num_blocks": 3}},
}

# Key -> shape, worked out by hand from the reference modules and configs (not from this implementation).
FOMM_PUBLIC = {
    "kp_detector": {
        "predictor.encoder.down_blocks.0.conv.weight": (64, 3, 3, 3),
        "predictor.encoder.down_blocks.4.conv.weight": (1024, 512, 3, 3),
        "predictor.decoder.up_blocks.0.conv.weight": (512, 1024, 3, 3),
        "predictor.decoder.up_blocks.4.norm.running_var": (32,),
        "kp.weight": (10, 35, 7, 7),
        "jacobian.weight": (40, 35, 7, 7),
        "down.weight": (3, 1, 13, 13),
    },
    "generator": {
        "first.conv.weight": (64, 3, 7, 7),
        "down_blocks.1.conv.weight": (256, 128, 3, 3),
        "bottleneck.r5.conv2.weight": (256, 256, 3, 3),
        "up_blocks.0.conv.weight": (128, 256, 3, 3),
        "final.weight": (3, 64, 7, 7),
        "dense_motion_network.hourglass.encoder.down_blocks.0.conv.weight": (128, 44, 3, 3),
        "dense_motion_network.hourglass.decoder.up_blocks.0.conv.weight": (1024, 1024, 3, 3),
        "dense_motion_network.hourglass.decoder.up_blocks.4.conv.weight": (64, 256, 3, 3),
        "dense_motion_network.mask.weight": (11, 108, 7, 7),
        "dense_motion_network.occlusion.weight": (1, 108, 7, 7),
        "dense_motion_network.down.weight": (3, 1, 13, 13),
        "first.norm.num_batches_tracked": (),
    },
}
FV2V_PUBLIC = {
    "kp_detector": {
        "predictor.down_blocks.down0.conv.weight": (64, 3, 3, 3),
        "predictor.down_blocks.down4.conv.weight": (1024, 512, 3, 3),
        "predictor.conv.weight": (16384, 1024, 1, 1),
        "predictor.up_blocks.up0.conv.weight": (512, 1024, 3, 3, 3),
        "predictor.up_blocks.up4.norm.running_mean": (32,),
        "kp.weight": (15, 32, 3, 3, 3),
        "down.weight": (3, 1, 13, 13),
    },
    "he_estimator": {
        "conv1.weight": (64, 3, 7, 7),
        "conv2.weight": (256, 64, 1, 1),
        "block1.b1_0.conv1.weight": (64, 256, 1, 1),
        "block2.skip.weight": (512, 512, 1, 1),
        "block2.norm4.running_var": (512,),
        "block5.b5_4.conv3.weight": (1024, 256, 1, 1),
        "block7.b7_1.conv2.weight": (512, 512, 3, 3),
        "fc_roll.weight": (66, 2048),
        "fc_pitch.weight": (66, 2048),
        "fc_yaw.weight": (66, 2048),
        "fc_t.weight": (3, 2048),
        "fc_exp.weight": (45, 2048),
    },
    "generator": {
        "first.conv.weight": (64, 3, 3, 3),
        "second.weight": (512, 256, 1, 1),
        "resblocks_3d.3dr5.conv2.weight": (32, 32, 3, 3, 3),
        "third.conv.weight": (256, 512, 3, 3),
        "fourth.weight": (256, 256, 1, 1),
        "dense_motion_network.compress.weight": (4, 32, 1, 1, 1),
        "dense_motion_network.hourglass.encoder.down_blocks.0.conv.weight": (64, 80, 3, 3, 3),
        "dense_motion_network.hourglass.decoder.conv.weight": (112, 112, 3, 3, 3),
        "dense_motion_network.mask.weight": (16, 112, 7, 7, 7),
        "dense_motion_network.occlusion.weight": (1, 1792, 7, 7),
        "decoder.fc.weight": (512, 256, 3, 3),
        "decoder.G_middle_0.conv_0.weight_orig": (512, 512, 3, 3),
        "decoder.G_middle_0.conv_0.weight_u": (512,),
        "decoder.G_middle_0.conv_0.weight_v": (4608,),
        "decoder.G_middle_5.norm_1.mlp_shared.0.weight": (128, 256, 3, 3),
        "decoder.G_middle_5.norm_1.mlp_gamma.weight": (512, 128, 3, 3),
        "decoder.up_0.conv_s.weight_orig": (256, 512, 1, 1),
        "decoder.up_1.conv_0.weight_orig": (64, 256, 3, 3),
        "decoder.up_1.norm_s.mlp_beta.weight": (256, 128, 3, 3),
        "decoder.conv_img.weight": (3, 64, 3, 3),
    },
}
FV2V_ORIGINAL_GENERATOR = {
    "first.conv.weight": (64, 3, 7, 7),
    "resblocks_2d.2dr5.conv1.weight": (256, 256, 3, 3),
    "up_blocks.0.conv.weight": (128, 256, 3, 3),
    "up_blocks.1.conv.weight": (64, 128, 3, 3),
    "final.weight": (3, 64, 7, 7),
}


# ---------------------------------------------------------------------------------------------- helpers


def lively_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise randomly so that signals neither vanish nor explode (PyTorch's default init shrinks them
    through these deep stacks, and random networks would then ignore their inputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in module.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(layer, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                layer.weight.normal_(0.0, (2.0 / layer.weight[0].numel()) ** 0.5, generator=gen)
                if layer.bias is not None:
                    layer.bias.uniform_(-0.1, 0.1, generator=gen)
                if leaf in ("fc_t", "fc_exp"):  # translation and expression deltas stay small, as trained ones
                    layer.weight.mul_(0.01)
                    layer.bias.mul_(0.1)
                if leaf in ("final", "conv_img"):  # more output contrast
                    layer.weight.mul_(3.0)
                if leaf == "jacobian":  # near-identity Jacobians, as the reference initialises them
                    layer.weight.mul_(0.01)
                    layer.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(layer.bias.numel() // 4))
            elif isinstance(layer, SpectralConv2d):
                layer.weight_orig.normal_(0.0, (2.0 / layer.weight_orig[0].numel()) ** 0.5, generator=gen)
                layer.estimate_singular_vectors()
            elif isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm3d)):
                layer.running_mean.normal_(0.0, 0.1, generator=gen)
                layer.running_var.uniform_(0.5, 2.0, generator=gen)
                layer.num_batches_tracked.fill_(1000)
    return module


def save_public(path, modules: dict[str, nn.Module], legacy: bool = False, **junk) -> str:
    """``torch.save`` in the public wrapper format: one state dict per network plus training leftovers.
    legacy: the pre-1.6 (non-zip) serialisation, as vox-cpk.pth.tar was written with PyTorch 1.0."""
    checkpoint = {key: module.state_dict() for key, module in modules.items()}
    checkpoint.update(junk)
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return str(path)


def assert_public_layout(module: nn.Module, expected: dict[str, tuple], absent: tuple[str, ...] = ()) -> None:
    state = module.state_dict()
    for key, shape in expected.items():
        assert key in state, f"missing public key {key}"
        assert tuple(state[key].shape) == shape, f"{key}: {tuple(state[key].shape)} != public {shape}"
    for key in absent:
        assert key not in state, f"{key} is not in the public checkpoint"


def optimizer_junk(module: nn.Module) -> dict:
    return torch.optim.Adam(module.parameters(), lr=2e-4).state_dict()


def pose_motion(yaw: list[float], **expressions: list[float]) -> Motion:
    zeros = np.zeros(len(yaw), np.float32)
    return Motion(5.0, np.asarray(yaw, np.float32), zeros, zeros,
                  {k: np.asarray(v, np.float32) for k, v in expressions.items()})


def shifted_video(shifts: list[int], size: int = 64) -> FrameSet:
    """A driving video: the synthetic face moved sideways (random networks respond to where content is)."""
    image = synthetic_portrait(size, seed=1).image
    return FrameSet(np.stack([np.roll(image, s, axis=1) for s in shifts]), 5.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("talkinghead")


@pytest.fixture(scope="module")
def fv2v_file(store) -> str:
    torch.manual_seed(0)
    networks = build_facevid2vid(SMALL_FV2V)
    for module in networks.modules().values():
        lively_(module, seed=1)
    return save_public(store / "fv2v.pth.tar", networks.modules(), epoch_id=189,
                       optimizer_generator=optimizer_junk(networks.generator), discriminator={})


@pytest.fixture(scope="module")
def fomm_file(store) -> str:
    torch.manual_seed(0)
    networks = build_fomm(SMALL_FOMM)
    for module in networks.modules().values():
        lively_(module, seed=2)
    return save_public(store / "fomm.pth.tar", networks.modules(), legacy=True, epoch=99,
                       optimizer_kp_detector=optimizer_junk(networks.kp_detector), discriminator={})


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "weights"))
    return tmp_path


def fv2v(fv2v_file: str, **options) -> FaceVid2Vid:
    return FaceVid2Vid({"checkpoint": fv2v_file, "model_params": SMALL_FV2V, **options}, contracts.tiny_context())


def fomm(fomm_file: str, **options) -> FOMM:
    return FOMM({"checkpoint": fomm_file, "model_params": SMALL_FOMM, **options}, contracts.tiny_context())


# ---------------------------------------------------------------------------------------------- plugin


def test_plugin_registers_without_importing_torch():
    code = ("import sys; from ophav_core.plugins import build_host; import ophav_talkinghead.plugin as p; "
            "host = build_host([('talkinghead', p)], load_entry_points=False); "
            "assert not host.failures, host.failures; "
            "assert host.registry.names('image2video') == ['facevid2vid', 'fomm'], host.registry.names('image2video'); "
            "assert sorted(host.weights) == ['facevid2vid-vox-256', 'fomm-vox-256'], host.weights; "
            "[s.options_model()() for s in host.registry.by_stage('image2video')]; "
            "assert 'torch' not in sys.modules, 'torch imported while registering'")
    env_ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert env_ok.returncode == 0, env_ok.stderr[-2000:]
    assert FOMM_VOX.restricted and FOMM_VOX.license == "CC BY-NC 4.0" and FOMM_VOX.filename == "vox-cpk.pth.tar"
    assert FACEVID2VID_VOX.filename == "00000189-checkpoint.pth.tar" and FACEVID2VID_VOX.restricted


# ---------------------------------------------------------------------------------- full public architectures


def test_fomm_vox256_public_layout_loads_strictly_and_runs_at_256(store):
    torch.manual_seed(0)
    public = build_fomm()
    for key, expected in FOMM_PUBLIC.items():
        assert_public_layout(public.modules()[key], expected)
    path = save_public(store / "vox-cpk.pth.tar", public.modules(), epoch=99, discriminator={"x": torch.zeros(1)},
                       optimizer_generator={"state": {}, "param_groups": []})
    assert verify(FOMM_VOX, Path(path)) is None  # the weight store's structural check

    loaded = FOMM({"checkpoint": path}, contracts.tiny_context()).networks()
    for key, module in public.modules().items():
        for name, tensor in module.state_dict().items():
            assert torch.equal(loaded.modules()[key].state_dict()[name], tensor), f"{key}.{name} not loaded"
    image = torch.from_numpy(synthetic_portrait(256).image).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        kp = loaded.kp_detector(image)
        out = loaded.generator(image, {k: v.flip(1) for k, v in kp.items()}, kp)
    assert kp["value"].shape == (1, 10, 2) and kp["jacobian"].shape == (1, 10, 2, 2)
    assert out.shape == (1, 3, 256, 256) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_facevid2vid_public_layout_both_decoders_and_full_forward():
    torch.manual_seed(0)
    public = build_facevid2vid()
    for key, expected in FV2V_PUBLIC.items():
        assert_public_layout(public.modules()[key], expected,
                             absent=("decoder.up_0.conv_s.bias", "final.weight") if key == "generator" else ())
    original = OcclusionAwareGenerator(**VOX_256["generator_params"], **VOX_256["common_params"], decoder="original")
    assert_public_layout(original, FV2V_ORIGINAL_GENERATOR, absent=("decoder.fc.weight",))

    # The full networks run; 128x128 keeps this affordable on a CPU (256 is exercised by the small copies).
    image = torch.from_numpy(synthetic_portrait(128).image).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        canonical = public.kp_detector(image)
        head = public.he_estimator(image)
        angles = [bins_to_degrees(head[k]) for k in ("yaw", "pitch", "roll")]
        source = posed_keypoints(canonical, rotation_matrix(*angles), head["t"], head["exp"])
        turned = rotation_matrix(angles[0] + 20, angles[1], angles[2])
        driving = posed_keypoints(canonical, turned, head["t"], head["exp"])
        out = public.generator(image, driving, source)
    assert canonical.shape == (1, 15, 3) and float(canonical.abs().max()) <= 1.0
    assert head["yaw"].shape == (1, 66) and head["exp"].shape == (1, 15, 3) and head["t"].shape == (1, 3)
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- checkpoints


def test_missing_checkpoint_names_the_file(empty_store):
    with pytest.raises(WeightsMissing, match=r"00000189-checkpoint\.pth\.tar"):
        FaceVid2Vid({}, contracts.tiny_context()).networks()
    with pytest.raises(WeightsMissing, match=r"vox-cpk\.pth\.tar"):
        FOMM({}, contracts.tiny_context()).networks()
    with pytest.raises(WeightsMissing, match="nowhere.pth"):
        FOMM({"checkpoint": str(empty_store / "nowhere.pth")}, contracts.tiny_context()).networks()


def test_checkpoint_problems_name_the_file_and_key(fv2v_file, store):
    full = torch.load(fv2v_file, map_location="cpu", weights_only=True)
    no_he = {k: v for k, v in full.items() if k != "he_estimator"}
    torch.save(no_he, store / "no_he.pth.tar")
    with pytest.raises(CheckpointError, match=r"no_he\.pth\.tar.*missing key 'he_estimator'"):
        fv2v(str(store / "no_he.pth.tar")).networks()

    bad = dict(full)
    bad["kp_detector"] = {**full["kp_detector"], "kp.weight": torch.zeros(3, 3)}
    bad["kp_detector"]["extra.weight"] = torch.zeros(1)
    torch.save(bad, store / "bad.pth.tar")
    with pytest.raises(CheckpointError, match=r"bad\.pth\.tar: 'kp_detector'.*unexpected: extra\.weight.*kp\.weight"):
        fv2v(str(store / "bad.pth.tar")).networks()

    # A small copy is not the public file: the weight store's verification says so instead of accepting it.
    problem = verify(FACEVID2VID_VOX, Path(fv2v_file))
    assert problem is not None and "does not match" in problem


# ---------------------------------------------------------------------------------------------- face-vid2vid


def test_facevid2vid_contract_at_256(fv2v_file):
    component = fv2v(fv2v_file, batch_size=1)
    frames = contracts.check_image2video(component, synthetic_portrait(64), pose_motion([0.0, 30.0]))
    assert frames.size == (32, 32)  # the tiny profile's resolution
    assert frames.driving["keypoints"].shape == (2, 5, 3)
    # The motion's yaw is relative to the portrait's own pose and enters with the Hopenet sign (yaw flipped).
    assert np.allclose(frames.driving["model_yaw"][1] - frames.driving["model_yaw"][0], -30.0, atol=1e-3)
    assert np.allclose(frames.driving["model_pitch"], frames.driving["model_pitch"][0])


def test_facevid2vid_driving_changes_frames(fv2v_file):
    # One call, two batches: neutral, neutral again, talking, turned.
    motion = pose_motion([0.0, 0.0, 0.0, 25.0], mouth_open=[0.0, 0.0, 1.0, 0.0], smile=[0.0, 0.0, 1.0, 0.0])
    frames = fv2v(fv2v_file, size=48, batch_size=2).generate(synthetic_portrait(64), motion)
    assert frames.frames.shape == (4, 48, 48, 3) and frames.fps == 5.0
    neutral, again, talking, turned = frames.frames.astype(int)
    assert np.array_equal(neutral, again), "the same driving must give the same frame"
    for other, what in ((talking, "expressions"), (turned, "yaw")):
        change = np.abs(other - neutral).mean()
        assert change > 0.5, f"{what} changed the frame by only {change:.2f}"
    keypoints = frames.driving["keypoints"]
    assert np.allclose(keypoints[0], keypoints[1]) and not np.allclose(keypoints[2], keypoints[0])
    assert np.allclose(frames.driving["expr_smile"], [0, 0, 1, 0])


def test_facevid2vid_original_decoder_checkpoint_is_detected(store):
    torch.manual_seed(3)
    networks = build_facevid2vid(SMALL_FV2V, decoder="original")
    for module in networks.modules().values():
        lively_(module, seed=3)
    path = save_public(store / "original.pth.tar", networks.modules())
    frames = fv2v(path).generate(synthetic_portrait(64), pose_motion([10.0]))
    assert frames.frames.shape == (1, 32, 32, 3) and frames.frames.std() > 1.0
    with pytest.raises(CheckpointError, match=r"original\.pth\.tar: 'generator' does not match .*spade decoder"):
        fv2v(path, decoder="spade").networks()


def test_expression_offsets_follow_the_documented_mapping():
    # Canonical keypoints of a face (x right, y down): brow, eyes, nose, mouth corners, chin.
    canonical = torch.tensor([[[0.0, -0.5, 0.0], [-0.2, -0.2, 0.0], [0.2, -0.2, 0.0], [0.0, 0.0, -0.1],
                               [-0.15, 0.25, 0.0], [0.15, 0.25, 0.0], [0.0, 0.45, 0.0]]])
    one, zero = torch.ones(1), torch.zeros(1)
    offsets = lambda **levels: expression_offsets(canonical, levels)[0]  # noqa: E731
    assert torch.count_nonzero(offsets(smile=zero, blink=zero)) == 0
    jaw = offsets(mouth_open=one)
    assert jaw[6, 1] > 0.05 and abs(float(jaw[0, 1])) < 1e-3 and jaw[:, 0].abs().max() == 0
    smile = offsets(smile=one)
    assert smile[5, 0] > 0 > smile[4, 0] and smile[5, 1] < 0  # corners out and up
    brows = offsets(brows_up=one)
    assert brows[0, 1] < -0.02 and abs(float(brows[6, 1])) < 1e-3
    blink = offsets(blink=one)
    assert blink[1, 1] > blink[6, 1] >= 0


def test_head_pose_conventions():
    one_hot = torch.full((1, 66), -1e4)
    one_hot[0, 33] = 0.0
    assert abs(float(bins_to_degrees(one_hot))) < 1e-3  # bin 33 is 0 degrees (3 * 33 - 99)
    rot = rotation_matrix(torch.tensor([30.0]), torch.tensor([-10.0]), torch.tensor([5.0]))
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3)[None], atol=1e-5)
    yaw_only = rotation_matrix(torch.tensor([90.0]), torch.zeros(1), torch.zeros(1))[0]
    assert torch.allclose(yaw_only @ torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0]), atol=2e-3)


# ---------------------------------------------------------------------------------------------- FOMM


def test_fomm_contract_and_relative_transfer(fomm_file):
    component = fomm(fomm_file, batch_size=2)
    motion = pose_motion([0.0, 0.0, 0.0])
    motion.video = shifted_video([0, 24, -24])
    frames = contracts.check_image2video(component, synthetic_portrait(64), motion)
    assert frames.driving["keypoints"].shape == (3, 5, 2) and list(frames.driving["driver_frame"]) == [0, 1, 2]

    # Relative mode: a driver that never moves leaves the portrait as it is in every frame.
    still = pose_motion([0.0, 0.0, 0.0])
    still.video = shifted_video([24, 24, 24])
    static = component.generate(synthetic_portrait(64), still)
    assert np.array_equal(static.frames[0], static.frames[2]) and np.array_equal(static.frames[0], frames.frames[0])
    # A different driving video gives different frames; a longer video is resampled to the motion's length.
    other = pose_motion([0.0, 0.0, 0.0])
    other.video = shifted_video([0, -12, 12, 30, 6])
    moved = fomm(fomm_file, adapt_movement_scale=True).generate(synthetic_portrait(64), other)
    assert list(moved.driving["driver_frame"]) == [0, 2, 4]
    assert np.abs(moved.frames[1:].astype(int) - frames.frames[1:].astype(int)).mean() > 0.5


def test_fomm_needs_a_driving_video(empty_store):
    with pytest.raises(UsageError, match="FOMM needs a driving video.*--driver"):
        FOMM({}, contracts.tiny_context()).generate(synthetic_portrait(64), pose_motion([0.0, 10.0]))


def test_bad_model_params_are_a_usage_error(fomm_file):
    with pytest.raises(UsageError, match="model_params"):
        FOMM({"checkpoint": fomm_file, "model_params": {"kp_detector_params": {"no_such": 1}}},
             contracts.tiny_context()).networks()
