"""Matting segmenters (rvm, bisenet) and the head cut, with randomly initialised networks in the public formats:
a scripted module with RVM's TorchScript signature, and a BiSeNet state dict with facexlib's names."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import Tensor, nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ophav_core.errors import InvalidData, UsageError, WeightsMissing  # noqa: E402
import ophav_core.stages  # noqa: E402,F401 - first: importing ophav_core.stages.motion before the stages is circular
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking  # noqa: E402
from ophav_core.weights import verify  # noqa: E402
from ophav_matting import bisenet as bs  # noqa: E402
from ophav_matting import rvm  # noqa: E402
from ophav_matting.headcut import head_cut, lower_envelope  # noqa: E402
from ophav_matting.weights import BISENET_79999, BISENET_FACEXLIB, RVM_MOBILENETV3, RVM_RESNET50  # noqa: E402


# ---------------------------------------------------------------------------------------------- fixtures


class TinyRVM(nn.Module):
    """RVM's scripted interface with one real recurrent state: r1 is a running mean of features at the internal
    resolution, so frame t's alpha depends on frames before it; r2 records the downsample ratio it was given."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, src: Tensor, r1: Optional[Tensor] = None, r2: Optional[Tensor] = None,
                r3: Optional[Tensor] = None, r4: Optional[Tensor] = None, downsample_ratio: float = 1.0,
                segmentation_pass: bool = False) -> List[Tensor]:
        seq = src if src.dim() == 5 else src.unsqueeze(1)
        state = r1
        phas: List[Tensor] = []
        for t in range(seq.shape[1]):
            x = seq[:, t]
            small = x
            if downsample_ratio != 1.0:
                small = F.interpolate(x, scale_factor=downsample_ratio, mode="bilinear", align_corners=False,
                                      recompute_scale_factor=False)
            feat = torch.tanh(self.encode(small))
            memory = feat if state is None else 0.5 * state + 0.5 * feat
            state = memory
            pha = torch.sigmoid(self.head(torch.cat([feat, memory], dim=1)))
            phas.append(F.interpolate(pha, size=[x.shape[-2], x.shape[-1]], mode="bilinear", align_corners=False))
        pha = torch.stack(phas, dim=1)
        if src.dim() == 4:
            pha = pha[:, 0]
        assert state is not None
        ratio = torch.full([1], downsample_ratio)
        return [src, pha, state, ratio, ratio, ratio]


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A weight store holding random-init files under the public file names."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    _script(TinyRVM().eval(), root / RVM_MOBILENETV3.filename)
    torch.save(bs.BiSeNet(19).state_dict(), root / BISENET_FACEXLIB.filename)
    return root


@pytest.fixture()
def weights_env(store, monkeypatch) -> Path:
    monkeypatch.setenv("OPHAV_WEIGHTS", str(store))
    return store


@pytest.fixture(scope="module")
def scene():
    tracking = synthetic_tracking(4, 64)
    frames, masks = render_synthetic(tracking)
    return tracking, frames, masks


def _context():
    return contracts.tiny_context()


# ---------------------------------------------------------------------------------------------- head cut


def test_head_cut_removes_everything_below_the_jaw(scene):
    tracking, frames, _ = scene
    full = np.ones((len(tracking), 64, 64), np.float32)
    cut = head_cut(full, tracking, neck_margin=0.08, feather=0.04)
    assert cut.shape == full.shape and cut.dtype == np.float32 and full.min() == 1.0  # input untouched
    uv = tracking.project(tracking.vertices)
    for i in range(len(tracking)):
        chin, top = uv[i, :, 1].max(), uv[i, :, 1].min()
        face_height = chin - top
        below = int(np.ceil(chin + (0.08 + 0.02) * face_height + 1.5))
        assert below < 64, "the synthetic face must leave rows below the cut"
        assert cut[i, below:].max() == 0.0, f"frame {i}: something kept below the jaw"
        assert cut[i, : int(top)].min() == 1.0, f"frame {i}: something cut above the face (hair)"
        centre = np.rint(uv[i].mean(axis=0)).astype(int)
        assert cut[i, centre[1], centre[0]] == 1.0
        ramp = cut[i, int(chin):below]
        assert ((ramp > 0) & (ramp < 1)).any(), "the edge is not feathered"
        beside = int(np.floor(uv[i, :, 0].min())) - 2  # left of the face, just above chin level: hair is kept
        assert beside >= 0 and cut[i, int(chin) - 3, beside] == 1.0, f"frame {i}: hair beside the face cut"


def test_head_cut_follows_a_named_jaw_and_image_size(scene):
    tracking, _, _ = scene
    canon = tracking.canonical_vertices
    # A "jaw" at the eye line (canonical y = -2.5): the cut must move up to it, and work at 2x the resolution.
    jaw = np.flatnonzero((np.abs(canon[:, 1] + 2.6) < 1.2) & (canon[:, 2] < 0))
    high = tracking.subset(np.arange(len(tracking)))
    high.semantic["jaw"] = jaw
    full = np.ones((len(tracking), 128, 128), np.float32)
    default, named = head_cut(full, tracking, 0.0, 0.0), head_cut(full, high, 0.0, 0.0)
    assert named.sum() < 0.8 * default.sum()
    uv = high.project(high.vertices[0, jaw]) * 2 + 0.5  # pixels at 128
    x, y = np.rint(uv.mean(axis=0)).astype(int)
    assert named[0, y - 6, x] == 1.0 and named[0, y + 6, x] == 0.0 and default[0, y + 6, x] == 1.0


def test_head_cut_rejects_mismatched_frames(scene):
    tracking, _, _ = scene
    with pytest.raises(InvalidData, match="frames"):
        head_cut(np.ones((3, 64, 64), np.float32), tracking)


def test_lower_envelope_is_the_bottom_of_the_hull():
    a = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 2.0, 2.0])
    s = np.array([0.0, 2.0, 1.0, 2.0, 0.0, 5.0, -3.0])
    chain_a, chain_s = lower_envelope(a, s)
    assert list(chain_a) == [0.0, 2.0, 4.0] and list(chain_s) == [0.0, 5.0, 0.0]


# ---------------------------------------------------------------------------------------------- rvm


def test_auto_downsample_ratio_matches_rvm_guidance():
    assert rvm.auto_downsample_ratio(64, 64) == 1.0
    assert rvm.auto_downsample_ratio(512, 512) == 1.0
    assert rvm.auto_downsample_ratio(1080, 1920) == pytest.approx(512 / 1920)
    h, w = rvm.internal_size(720, 1280, rvm.auto_downsample_ratio(720, 1280))
    assert max(h, w) <= 512 and min(h, w) >= 256
    assert rvm.auto_downsample_ratio(1024, 1024, max_internal_size=256) == 0.25


def test_rvm_carries_the_recurrent_state(weights_env, scene):
    _, frames, _ = scene
    model = rvm.load_torchscript(weights_env / RVM_MOBILENETV3.filename)
    video = frames.frames
    alpha, rec = rvm.run_matting(model, video, 0.5, seq_chunk=1)
    assert alpha.shape == video.shape[:3] and alpha.dtype == np.float32
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0 and alpha.std() > 0
    assert tuple(rec[0].shape[-2:]) == rvm.internal_size(64, 64, 0.5), "not run at the chosen internal size"
    assert float(rec[1]) == 0.5
    # Same last frame after a different history: the output differs only through the carried state.
    other = np.concatenate([255 - video[:3], video[3:]])
    alpha_other, _ = rvm.run_matting(model, other, 0.5, seq_chunk=1)
    assert np.abs(alpha_other[3] - alpha[3]).max() > 1e-4
    # Alone, the frame gives a third answer; chunked runs carry the state exactly like frame-by-frame runs.
    alone, _ = rvm.run_matting(model, video[3:], 0.5)
    assert np.abs(alone[0] - alpha[3]).max() > 1e-4
    chunked, _ = rvm.run_matting(model, video, 0.5, seq_chunk=3)
    np.testing.assert_allclose(chunked, alpha, atol=1e-5)
    warmed, _ = rvm.run_matting(model, video, 0.5, seq_chunk=2, warmup_frames=2)
    assert np.abs(warmed[0] - alpha[0]).max() > 1e-4 and warmed.shape == alpha.shape


def test_rvm_segmenter_contract_and_ratio(weights_env, scene):
    tracking, frames, _ = scene
    seg = rvm.RVMSegmenter({"max_internal_size": 32}, _context())
    assert seg.downsample_ratio(64, 64) == 0.5
    masks = contracts.check_segmenter(seg, frames, tracking)
    person = seg.matte(frames)
    assert (masks.alpha <= person + 1e-6).all(), "the head cut may only remove"
    assert masks.alpha[:, -4:].max() == 0.0 and person[:, -4:].max() > 0.0, "nothing cut below the jaw"
    untracked = seg.segment(frames, None)
    np.testing.assert_allclose(untracked.alpha, person, atol=1e-6)
    contracts.check_segmenter(rvm.RVMSegmenter({"seq_chunk": 2}, _context()))


def test_rvm_missing_weights_names_the_file(tmp_path, monkeypatch, scene):
    _, frames, _ = scene
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissing) as info:
        rvm.RVMSegmenter({"variant": "resnet50"}, _context()).segment(frames)
    message = str(info.value)
    assert RVM_RESNET50.filename in message and RVM_RESNET50.url in message and str(tmp_path) in message
    with pytest.raises(UsageError, match="URL"):
        rvm.RVMSegmenter({"weights": "https://example.org/rvm.torchscript"}, _context()).segment(frames)


def test_rvm_verify_checks_the_signature(weights_env, tmp_path):
    assert verify(RVM_MOBILENETV3, weights_env / RVM_MOBILENETV3.filename) is None

    class NotRVM(nn.Module):
        def forward(self, image: Tensor) -> Tensor:
            return image

    problem = verify(RVM_MOBILENETV3, _script(NotRVM(), tmp_path / "other.torchscript"))
    assert problem is not None and "downsample_ratio" in problem


# ---------------------------------------------------------------------------------------------- bisenet


# Names and shapes from facexlib/parsing/{bisenet,resnet}.py, written out here so the test does not only
# compare the network with itself.
FACEXLIB_KEYS = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "cp.resnet.layer4.1.bn2.running_var": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.weight": (128,),
    "cp.conv_head32.bn.running_mean": (128,),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv_out.weight": (19, 64, 1, 1),
    "conv_out32.conv.conv.weight": (64, 128, 3, 3),
}


def test_bisenet_state_dict_has_the_public_layout(store):
    state = torch.load(store / BISENET_FACEXLIB.filename, map_location="cpu", weights_only=True)
    for key, shape in FACEXLIB_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert {k.split(".")[0] for k in state} == {"cp", "ffm", "conv_out", "conv_out16", "conv_out32"}
    assert not any(k.startswith("cp.resnet.fc") or k.startswith("sp.") for k in state)


def test_bisenet_loads_79999_variants_strictly(store, tmp_path):
    state = torch.load(store / BISENET_FACEXLIB.filename, map_location="cpu", weights_only=True)
    legacy = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(legacy, tmp_path / BISENET_79999.filename)
    assert verify(BISENET_79999, tmp_path / BISENET_79999.filename) is None
    model = bs.load_bisenet(tmp_path / BISENET_79999.filename)
    torch.testing.assert_close(model.state_dict()["ffm.conv1.weight"], state["ffm.conv1.weight"])
    broken = dict(state)
    broken.pop("conv_out.conv_out.weight")
    torch.save(broken, tmp_path / "broken.pth")
    assert verify(BISENET_FACEXLIB, tmp_path / "broken.pth") is not None


def test_kept_classes_and_soft_head_alpha():
    assert bs.kept_classes() == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17)
    assert 14 in bs.kept_classes(keep_neck=True) and 18 in bs.kept_classes(keep_hat=True)
    assert not {0, 15, 16} & set(bs.kept_classes(True, True))
    # Four pixels: pure skin, pure cloth, half hair / half neck, half background / half hair.
    probs = np.zeros((1, 19, 1, 4), np.float32)
    probs[0, 1, 0, 0] = 1.0
    probs[0, 16, 0, 1] = 1.0
    probs[0, 17, 0, 2], probs[0, 14, 0, 2] = 0.5, 0.5
    probs[0, 0, 0, 3], probs[0, 17, 0, 3] = 0.5, 0.5
    np.testing.assert_allclose(bs.head_alpha(probs, bs.kept_classes())[0, 0], [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(bs.head_alpha(probs, bs.kept_classes(keep_neck=True))[0, 0], [1.0, 0.0, 1.0, 0.5])
    # With a separate matte the background is the matte's job: only body classes lower the alpha.
    np.testing.assert_allclose(bs.head_alpha(probs, bs.kept_classes(), True)[0, 0], [1.0, 0.0, 0.5, 1.0])
    assert torch.allclose(bs.head_alpha(torch.from_numpy(probs), bs.kept_classes())[0, 0],
                          torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_bisenet_probabilities_are_soft_and_sized(store):
    model = bs.load_bisenet(store / BISENET_FACEXLIB.filename)
    frames = np.random.default_rng(0).integers(0, 255, (2, 48, 40, 3), dtype=np.uint8)
    with torch.inference_mode():
        probs = bs.parse_probabilities(model, frames, parse_size=64)
    assert probs.shape == (2, 19, 48, 40)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 48, 40), atol=1e-4, rtol=0)


def test_bisenet_segmenter_contract(weights_env, scene):
    tracking, frames, _ = scene
    seg = bs.BiSeNetSegmenter({"parse_size": 64, "batch_size": 3}, _context())
    masks = contracts.check_segmenter(seg, frames, tracking)
    assert masks.alpha[:, -4:].max() == 0.0
    loose = bs.BiSeNetSegmenter({"parse_size": 64, "head_cut": False, "keep_neck": True}, _context())
    plain = loose.segment(frames).alpha
    assert plain.std() > 0 and (masks.alpha <= plain + 1e-6).all()


def test_bisenet_times_rvm_matte(weights_env, scene):
    tracking, frames, _ = scene
    combined = bs.BiSeNetSegmenter({"parse_size": 64, "matte": "rvm", "head_cut": False}, _context())
    alpha = contracts.check_segmenter(combined, frames, tracking).alpha
    person = rvm.RVMSegmenter({}, _context()).matte(frames)
    assert (alpha <= person + 1e-6).all() and alpha.max() > 0


def test_bisenet_missing_weights_names_the_file(store, tmp_path, monkeypatch, scene):
    _, frames, _ = scene
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsMissing, match=BISENET_79999.filename.replace(".", r"\.")):
        bs.BiSeNetSegmenter({"checkpoint": "79999"}, _context()).segment(frames)
    # Combined with RVM, the RVM file is named when only it is missing.
    shutil.copyfile(store / BISENET_FACEXLIB.filename, tmp_path / BISENET_FACEXLIB.filename)
    with pytest.raises(WeightsMissing, match=RVM_MOBILENETV3.filename.replace(".", r"\.")):
        bs.BiSeNetSegmenter({"matte": "rvm", "parse_size": 64}, _context()).segment(frames)


def test_plugin_registers_components_and_weights():
    from ophav_matting import plugin

    specs, weights = [], []
    plugin.register_segmenter(register=specs.append)
    plugin.register_weights(register=weights.append)
    assert {s.name for s in specs} == {"rvm", "bisenet"}
    for spec in specs:
        contracts.check_options_model(spec.component_class())
        assert set(spec.weights) <= {w.name for w in weights}
    assert {w.filename for w in weights} == {"rvm_mobilenetv3_fp32.torchscript", "rvm_resnet50_fp32.torchscript",
                                             "parsing_bisenet.pth", "79999_iter.pth"}
    assert all(w.verify and w.url.startswith("https://") for w in weights)
