"""Face restorers (gfpgan, codeformer, gpen): alignment, strict loading of the public checkpoint formats, restore.

No pretrained weights exist here: each network is randomly initialised and saved in its exact public format
({'params_ema': state_dict} for GFPGAN and CodeFormer, a raw state dict for GPEN), then loaded strictly
through the plugin's loader. The 512x512 networks cost several CPU seconds per forward, so each runs once
(marked slow)."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cv2")

from ophav_core.errors import InvalidData, WeightsMissing  # noqa: E402
from ophav_core.stages.data import RestoreInput  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import synthetic_restore_input, synthetic_tracking  # noqa: E402
from ophav_core.weights import verify as store_verify  # noqa: E402
from ophav_facerestore import align as A  # noqa: E402
from ophav_facerestore import networks, weightfiles  # noqa: E402
from ophav_facerestore.checkpoint import WeightsInvalid  # noqa: E402
from ophav_facerestore.codeformer import CodeFormerRestorer  # noqa: E402
from ophav_facerestore.gfpgan import GFPGANRestorer  # noqa: E402
from ophav_facerestore.gpen import GPENRestorer  # noqa: E402
from ophav_facerestore.options import CodeFormerOptions, GFPGANOptions  # noqa: E402

NETWORKS = {
    # name: (component, format, weight, package the definition comes from)
    "gfpgan": (GFPGANRestorer, networks.GFPGAN_FORMAT, weightfiles.GFPGAN_V14, "gfpgan"),
    "codeformer": (CodeFormerRestorer, networks.CODEFORMER_FORMAT, weightfiles.CODEFORMER, "codeformer"),
    "gpen": (GPENRestorer, networks.GPEN_FORMAT, weightfiles.GPEN_BFR_512, None),
}


def _skip_without(package: str | None) -> None:
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


def small_face_input(size: int = 64) -> RestoreInput:
    """The synthetic render shrunk to half size in the middle of a grey canvas of ``size``: the face crop
    (about 1.5x the head's width) then leaves a margin of untouched pixels all around."""
    import cv2

    full = synthetic_restore_input(1, size)
    half, offset = size // 2, size // 4

    def shrink(stack: np.ndarray, fill) -> np.ndarray:
        out = np.full_like(stack, fill)
        for i, item in enumerate(stack):
            out[i, offset:offset + half, offset:offset + half] = cv2.resize(item, (half, half),
                                                                            interpolation=cv2.INTER_AREA)
        return out

    to_small = lambda points: (points + 0.5) * 0.5 - 0.5 + offset  # noqa: E731 - pixel centres at integers
    return RestoreInput(images=shrink(full.images, 90), alpha=shrink(full.alpha, 0.0),
                        landmarks5=to_small(full.landmarks5), vertices2d=to_small(full.vertices2d),
                        vertex_depth=full.vertex_depth, portrait=full.portrait,
                        portrait_vertices2d=full.portrait_vertices2d, portrait_vertex_depth=full.portrait_vertex_depth,
                        faces=full.faces)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


# ---------------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("template", [A.ffhq_template(512), A.gpen_template(512)], ids=["ffhq", "gpen"])
def test_landmarks_at_the_template_align_to_the_identity(template):
    # RestoreInput order is the subject's left eye first; the template lists the image-left eye first.
    subject_order = np.empty_like(template)
    subject_order[list(A.SUBJECT_TO_TEMPLATE)] = template
    assert subject_order[0, 0] > subject_order[1, 0], "the subject's left eye lies on the image right"
    alignment = A.align(subject_order[None], template, 512)
    assert alignment.usable.all()
    np.testing.assert_allclose(alignment.matrices[0], np.eye(2, 3), atol=1e-9)


def test_known_similarity_is_recovered():
    template = A.ffhq_template(512)
    angle, scale, shift = math.radians(17.0), 0.21, np.array([40.0, 25.0])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    image_points = template @ rot.T + shift  # template -> image
    subject_order = np.empty_like(image_points)
    subject_order[list(A.SUBJECT_TO_TEMPLATE)] = image_points
    alignment = A.align(subject_order[None], template, 512)
    np.testing.assert_allclose(_apply(alignment.matrices[0], image_points), template, atol=1e-6)
    np.testing.assert_allclose(alignment.inverse[0][:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(alignment.inverse[0][:, 2], shift, atol=1e-6)


def test_a_frontal_render_aligns_upright_with_eyes_in_template_order():
    tracking = synthetic_tracking(1, 64, max_yaw=0.0)
    landmarks = tracking.landmarks5()
    assert landmarks[0, 0, 0] > landmarks[0, 1, 0], "synthetic subject's left eye should be on the image right"
    alignment = A.align(landmarks, A.ffhq_template(512), 512)
    matrix = alignment.matrices[0]
    assert abs(math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))) < 3.0, "a frontal face must not be rotated"
    mapped = _apply(matrix, A.to_template_order(landmarks[0]))
    assert mapped[0, 0] < mapped[1, 0] and mapped[3, 0] < mapped[4, 0], "image-left points first in the crop"
    assert mapped[:2, 1].max() < mapped[2, 1] < mapped[3:, 1].min(), "eyes above nose above mouth"


def test_landmarks_in_the_wrong_order_are_refused():
    template = A.ffhq_template(512)
    # Image-order points passed as if they were in the subject's order: a mirror image of a face.
    with pytest.raises(InvalidData, match="subject's left eye"):
        A.align(template[None], template, 512)


def test_paste_back_changes_only_the_face_region():
    batch = small_face_input()
    alignment = A.align(batch.landmarks5, A.ffhq_template(512), 512)
    crops = A.warp_faces(batch.images, alignment, A.FFHQ_BORDER_RGB)
    # Pasting the unrestored crop back reproduces the image (up to two bilinear resamplings).
    same = A.paste_faces(batch.images, crops, alignment).astype(int)
    mask = A.paste_mask(alignment.inverse[0], 512, 64, 64)
    inside, outside = mask > 0.99, mask == 0
    assert inside.sum() > 200 and outside.sum() > 100
    assert np.abs(same[0] - batch.images[0].astype(int))[inside].mean() < 8
    # A white "restoration" shows inside the soft mask, never where the mask is zero, nor outside the alpha.
    white = np.full_like(crops, 255)
    out = A.paste_faces(batch.images, white, alignment, alpha=batch.alpha)
    head = inside & (batch.alpha[0] > 0.99)
    assert head.sum() > 100 and (out[0][head] == 255).all()
    keep = outside | (batch.alpha[0] == 0)
    np.testing.assert_array_equal(out[0][keep], batch.images[0][keep])
    hard = A.paste_mask(alignment.inverse[0], 512, 64, 64, soft=False)
    assert hard.sum() > mask.sum(), "the soft mask is eroded inside the crop's footprint"


def _upfirdn_by_definition(x: np.ndarray, kernel: np.ndarray, up: int, down: int, pad: tuple[int, int]) -> np.ndarray:
    """Zero-insert, pad (negative crops), convolve (true convolution), decimate: loops, for one 2D map."""
    h, w = x.shape
    upsampled = np.zeros((h * up, w * up))
    upsampled[::up, ::up] = x
    p0, p1 = pad
    padded = np.pad(upsampled, ((max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    padded = padded[max(-p0, 0): padded.shape[0] - max(-p1, 0), max(-p0, 0): padded.shape[1] - max(-p1, 0)]
    kh, kw = kernel.shape
    out = np.zeros((padded.shape[0] - kh + 1, padded.shape[1] - kw + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sum(padded[i + a, j + b] * kernel[kh - 1 - a, kw - 1 - b] for a in range(kh) for b in range(kw))
    return out[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (-1, 2)), (1, 2, (2, 2))])
def test_gpen_upfirdn2d_matches_its_definition(up, down, pad):
    from ophav_facerestore.gpen_arch import upfirdn2d

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 7, 7))
    kernel = rng.uniform(0.1, 1.0, size=(4, 4))  # asymmetric, so a missing flip shows
    got = upfirdn2d(torch.tensor(x, dtype=torch.float64), torch.tensor(kernel), up=up, down=down, pad=pad).numpy()
    for c in range(2):
        np.testing.assert_allclose(got[0, c], _upfirdn_by_definition(x[0, c], kernel, up, down, pad), atol=1e-10)


def test_gpen_parameter_names_and_shapes_follow_the_reference():
    with torch.device("meta"):
        state = networks.build_gpen().state_dict()
    expected = {  # from yangxy/GPEN face_model/gpen_model.py, FullGenerator(512, 512, 8, channel_multiplier=2)
        "ecd0.0.0.weight": (64, 3, 1, 1), "ecd0.0.1.bias": (64,), "ecd1.0.0.kernel": (4, 4),
        "ecd1.0.1.weight": (128, 64, 3, 3), "ecd7.0.1.weight": (512, 512, 3, 3), "final_linear.0.weight": (512, 8192),
        "generator.style.1.weight": (512, 512), "generator.style.8.bias": (512,), "generator.input.input": (1, 512, 4, 4),
        "generator.conv1.conv.weight": (1, 512, 512, 3, 3), "generator.conv1.activate.bias": (1024,),
        "generator.to_rgb1.conv.weight": (1, 3, 1024, 1, 1), "generator.convs.0.conv.weight": (1, 512, 1024, 3, 3),
        "generator.convs.0.conv.blur.kernel": (4, 4), "generator.convs.13.activate.bias": (128,),
        "generator.convs.13.noise.weight": (1,), "generator.to_rgbs.6.upsample.kernel": (4, 4),
        "generator.to_rgbs.6.bias": (1, 3, 1, 1),
    }
    for key, shape in expected.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, (key, tuple(state[key].shape))
    assert "generator.convs.14.conv.weight" not in state and "ecd8.0.1.weight" not in state


# ---------------------------------------------------------------------------------------------- checkpoints


class _Checkpoints:
    """Randomly initialised networks saved in their public formats, each made on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        _, fmt, weight, package = NETWORKS[name]
        _skip_without(package)
        if name not in self.paths:
            torch.manual_seed(0)
            state = fmt.build().state_dict()
            path = self.folder / weight.filename
            torch.save(state if fmt.wrapper is None else {fmt.wrapper: state}, path)
            self.paths[name] = path
        return self.paths[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> _Checkpoints:
    return _Checkpoints(tmp_path_factory.mktemp("facerestore-weights"))


def _checkpoint(checkpoints: _Checkpoints, name: str) -> Path:
    return checkpoints[name]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_public_format_loads_strictly(name, checkpoints):
    path = _checkpoint(checkpoints, name)
    _, fmt, weight, _ = NETWORKS[name]
    net = networks.load(fmt, path, weight)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    saved = saved if fmt.wrapper is None else saved[fmt.wrapper]
    loaded = net.state_dict()
    assert set(loaded) == set(saved)
    for key in list(saved)[:: max(1, len(saved) // 20)]:
        assert torch.equal(loaded[key], saved[key]), key
    assert not any(t.is_meta for t in loaded.values())
    assert store_verify(weight, path) is None, "the weight store's verify hook accepts the public format"
    assert "codeformer.app" not in sys.modules, "codeformer.app downloads weights when imported"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_restore_on_cpu_through_the_component(name, checkpoints):
    path = _checkpoint(checkpoints, name)
    component_cls = NETWORKS[name][0]
    component = component_cls({"checkpoint": str(path)}, contracts.tiny_context())
    batch = small_face_input()
    out = contracts.check_restorer(component, batch)
    alignment = A.align(batch.landmarks5, component.template(), 512)
    mask = A.paste_mask(alignment.inverse[0], 512, 64, 64)
    inside = (mask > 0.99) & (batch.alpha[0] > 0.99)
    far_outside = A.paste_mask(alignment.inverse[0], 512, 64, 64, soft=False) == 0
    assert inside.sum() > 100 and far_outside.sum() > 50
    changed = np.abs(out[0].astype(int) - batch.images[0].astype(int)).max(axis=-1)
    assert (changed[inside] > 0).mean() > 0.5, "the face was not replaced by the network's output"
    np.testing.assert_array_equal(out[0][far_outside], batch.images[0][far_outside])


def test_network_noise_is_seeded_without_touching_the_callers_random_state():
    component = GFPGANRestorer({}, contracts.tiny_context())
    before = torch.random.get_rng_state()
    with component._seeded_noise():
        first = torch.randn(4)
    with component._seeded_noise():
        second = torch.randn(4)
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("cls,options,filename", [
    (GFPGANRestorer, {}, "GFPGANv1.4.pth"), (GFPGANRestorer, {"model": "1.3"}, "GFPGANv1.3.pth"),
    (CodeFormerRestorer, {}, "codeformer.pth"), (GPENRestorer, {}, "GPEN-BFR-512.pth")])
def test_missing_weights_name_the_file_and_the_fix(cls, options, filename, tmp_path, monkeypatch):
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path))
    component = cls(options, contracts.tiny_context())
    with pytest.raises(WeightsMissing) as info:
        component.restore(synthetic_restore_input(1, 64))
    message = str(info.value)
    assert filename in message and "ophav weights add" in message and "https://" in message
    explicit = cls({**options, "checkpoint": str(tmp_path / "nowhere.pth")}, contracts.tiny_context())
    with pytest.raises(WeightsMissing, match="nowhere.pth"):
        explicit.network()


def test_another_networks_checkpoint_is_refused_with_a_clear_message(checkpoints):
    gpen = _checkpoint(checkpoints, "gpen")
    _skip_without("gfpgan")
    component = GFPGANRestorer({"checkpoint": str(gpen)}, contracts.tiny_context())
    with pytest.raises(WeightsInvalid) as info:
        component.network()
    message = str(info.value)
    assert str(gpen) in message and "params_ema" in message and "raw state dict" in message
    assert "GFPGANv1.4.pth" in message and "ophav weights add gfpgan-v1.4" in message
    problem = store_verify(weightfiles.GFPGAN_V14, gpen)
    assert problem is not None and "GFPGANv1.4.pth" in problem


def test_a_checkpoint_with_the_right_wrapper_but_wrong_keys_is_refused(checkpoints):
    gfpgan = _checkpoint(checkpoints, "gfpgan")
    _skip_without("codeformer")
    with pytest.raises(WeightsInvalid, match=r"does not match the codeformer.pth network: \d+ missing"):
        networks.load(networks.CODEFORMER_FORMAT, gfpgan, weightfiles.CODEFORMER)


def test_a_truncated_file_is_refused(checkpoints, tmp_path):
    source = _checkpoint(checkpoints, "gpen")
    truncated = tmp_path / "GPEN-BFR-512.pth"
    with open(source, "rb") as handle:
        truncated.write_bytes(handle.read(1 << 20))
    with pytest.raises(WeightsInvalid, match=r"truncated or not a PyTorch file") as info:
        networks.load(networks.GPEN_FORMAT, truncated, weightfiles.GPEN_BFR_512)
    assert str(truncated) in str(info.value)


class _TouchOnLoad:
    """Unpickling this would create ``marker``: the loader must refuse it, not run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "GPEN-BFR-512.pth"
    torch.save({"weight": torch.zeros(1), "payload": _TouchOnLoad(marker)}, path)
    with pytest.raises(WeightsInvalid, match="not tensors") as info:
        networks.load(networks.GPEN_FORMAT, path, weightfiles.GPEN_BFR_512)
    assert str(path) in str(info.value)
    assert not marker.exists(), "code from the checkpoint was executed"


# ---------------------------------------------------------------------------------------------- plugin


def test_plugin_registers_three_restorers_and_their_weights():
    from ophav_core.plugins import build_host
    from ophav_facerestore import plugin

    host = build_host(extra_plugins=[("facerestore-test", plugin)], load_entry_points=False)
    assert {"gfpgan", "codeformer", "gpen"} <= set(host.registry.names("restorer"))
    assert {"gfpgan-v1.3", "gfpgan-v1.4", "codeformer", "gpen-bfr-512"} <= set(host.weights)
    assert host.weights["codeformer"].restricted and host.weights["gpen-bfr-512"].restricted
    for name in ("gfpgan", "codeformer", "gpen"):
        spec = host.registry.get("restorer", name)
        assert set(spec.weights) <= set(host.weights)
        contracts.check_options_model(spec.component_class())
    with pytest.raises(ValueError):
        GFPGANOptions(model="1.2")
    with pytest.raises(ValueError):
        CodeFormerOptions(w=1.5)


def test_plugin_import_does_not_import_torch():
    code = ("import sys, ophav_facerestore.plugin, ophav_facerestore.options, ophav_facerestore.weightfiles; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_torchvision_stand_in_serves_basicsr_import():
    from ophav_facerestore.compat import ensure_torchvision_functional_tensor

    ensure_torchvision_functional_tensor()
    from torchvision.transforms.functional_tensor import rgb_to_grayscale

    grey = rgb_to_grayscale(torch.ones(1, 3, 2, 2))
    assert grey.shape == (1, 1, 2, 2) and torch.allclose(grey, torch.ones_like(grey), atol=1e-3)
