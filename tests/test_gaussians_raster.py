"""The Gaussian-splatting rasteriser (plugins/ophav_gaussians/raster): the PyTorch reference against a
brute-force per-pixel loop and finite differences, the Triton kernels against the reference (in the Triton
interpreter on the CPU, and on CUDA under ``-m gpu``)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
try:
    import ophav_gaussians.raster  # noqa: F401
except ModuleNotFoundError:  # the editable install predates the plugin: import it from the source tree
    sys.path.insert(0, str(PLUGINS))

from ophav_gaussians.raster import project_gaussians, render_gaussians  # noqa: E402
from ophav_gaussians.raster.projection import ALPHA_MAX, ALPHA_MIN, TRANSMITTANCE_MIN  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: on the shared 2-core machine, two intra-op threads fighting a busy core make every op
    ~100x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_scene(num, width, height, batch=1, seed=0, dtype=torch.float32, device="cpu", size=(0.03, 0.25)):
    """Random Gaussians in a box ~3 units in front of B cameras looking roughly at the origin."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(num, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    quats = torch.randn(num, 4, generator=g, dtype=torch.float64)
    lo, hi = math.log(size[0]), math.log(size[1])
    scales = torch.exp(torch.rand(num, 3, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    opacities = torch.rand(num, generator=g, dtype=torch.float64) * 0.9 + 0.05
    colors = torch.rand(batch, num, 3, generator=g, dtype=torch.float64)
    viewmats = torch.eye(4, dtype=torch.float64).repeat(batch, 1, 1)
    for b in range(batch):
        angle = 0.25 * b
        c, s = math.cos(angle), math.sin(angle)
        viewmats[b, :3, :3] = torch.tensor([[c, 0, -s], [0, 1, 0], [s, 0, c]], dtype=torch.float64)
        viewmats[b, :3, 3] = torch.tensor([0.05 * b, -0.03 * b, 3.0], dtype=torch.float64)
    focal = 1.1 * max(width, height)
    Ks = torch.tensor([[focal, 0, width / 2 + 0.3], [0, focal, height / 2 - 0.2], [0, 0, 1]],
                      dtype=torch.float64).repeat(batch, 1, 1)
    tensors = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                   viewmats=viewmats, Ks=Ks)
    return {k: v.to(dtype=dtype, device=device) for k, v in tensors.items()}


def brute_force(scene, width, height, background):
    """3DGS's per-pixel loop, literally: every visible Gaussian in depth order, no tiles."""
    proj = project_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"],
                             scene["viewmats"], scene["Ks"], width, height)
    batch = scene["viewmats"].shape[0]
    images, alphas, depths = [], [], []
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    for b in range(batch):
        color = torch.zeros(height, width, 3, dtype=torch.float64)
        depth = torch.zeros(height, width, dtype=torch.float64)
        trans = torch.ones(height, width, dtype=torch.float64)
        done = torch.zeros(height, width, dtype=torch.bool)
        z = proj.depths[b].detach().double()
        for i in sorted(range(z.numel()), key=lambda n: (float(z[n]), n)):
            if not proj.visible[b, i]:
                continue
            mx, my = proj.means2d[b, i].detach().double()
            ca, cb, cc = proj.conics[b, i].detach().double()
            dx, dy = mx - xs, my - ys
            power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
            alpha = torch.clamp(scene["opacities"][i].double() * torch.exp(power), max=ALPHA_MAX)
            use = (power <= 0) & (alpha >= ALPHA_MIN) & ~done
            after = trans * (1 - alpha)
            stop = use & (after < TRANSMITTANCE_MIN)
            done |= stop
            use &= ~stop
            w = torch.where(use, alpha * trans, torch.zeros_like(alpha))
            color += w[..., None] * scene["colors"][b, i].double()
            depth += w * z[i]
            trans = torch.where(use, after, trans)
        alpha_img = 1 - trans
        images.append(color + trans[..., None] * background[b].double())
        alphas.append(alpha_img)
        depths.append(depth / alpha_img.clamp(min=1e-10))
    return torch.stack(images), torch.stack(alphas), torch.stack(depths)


def render(scene, width, height, backend, background=None):
    return render_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"],
                            scene["viewmats"], scene["Ks"], width, height, background=background, backend=backend)


@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_reference_matches_the_brute_force_per_pixel_loop(dtype, bound):
    """Tiles of 16x16 with partial edge tiles (37x21), dense overlaps that make pixels stop early."""
    width, height = 37, 21
    scene = make_scene(80, width, height, batch=2, seed=1, dtype=dtype, size=(0.1, 0.6))
    scene["opacities"] = scene["opacities"].clamp(min=0.8)  # opaque enough for the 1e-4 stop to happen
    background = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]], dtype=dtype)
    out = render(scene, width, height, "torch", background)
    image, alpha, depth = brute_force(scene, width, height, background)
    assert out["image"].shape == (2, height, width, 3) and out["radii"].shape == (2, 80)
    stopped = float((alpha > 1 - 2 * TRANSMITTANCE_MIN).double().mean())
    assert 0.05 < stopped < 0.95, stopped  # both pixels that hit the stopping rule and pixels that did not
    assert float((out["image"].double() - image).abs().max()) < bound
    assert float((out["alpha"].double() - alpha).abs().max()) < bound
    assert float(((out["depth"].double() - depth).abs() * alpha).max()) < bound * 10


def test_projection_matches_the_jacobian_of_the_pinhole_camera():
    """Independent of the closed form: mean = pinhole(p), cov2d = J Sigma J^T + 0.3 I with J by autograd."""
    scene = make_scene(5, 64, 48, seed=2, dtype=torch.float64)
    proj = project_gaussians(scene["means"], scene["quats"], scene["scales"], scene["opacities"],
                             scene["viewmats"], scene["Ks"], 64, 48)
    K, view = scene["Ks"][0], scene["viewmats"][0]

    def pinhole(p):
        q = view[:3, :3] @ p + view[:3, 3]
        return (K[:2, :2] @ (q[:2] / q[2])) + K[:2, 2]

    for i in range(5):
        p = scene["means"][i]
        q = torch.nn.functional.normalize(scene["quats"][i], dim=0)
        w, x, y, z = q
        rot = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
        sigma = rot @ torch.diag(scene["scales"][i] ** 2) @ rot.T
        jac = torch.autograd.functional.jacobian(pinhole, p)
        cov = jac @ sigma @ jac.T + 0.3 * torch.eye(2, dtype=torch.float64)
        assert torch.allclose(proj.means2d[0, i], pinhole(p), atol=1e-9)
        assert torch.allclose(proj.conics[0, i], torch.linalg.inv(cov).reshape(-1)[[0, 1, 3]], rtol=1e-9, atol=1e-12)


def test_culling_behind_the_camera_and_off_screen():
    scene = make_scene(4, 32, 32, seed=3)
    scene["means"][0] = torch.tensor([0.0, 0.0, -3.5])  # behind the camera (z = -0.5)
    scene["means"][1] = torch.tensor([30.0, 0.0, 0.0])  # far off the right edge
    scene["opacities"][2] = 0.5 / 255  # can never reach the 1/255 alpha threshold
    scene["means"][3] = torch.tensor([0.0, 0.0, 0.0])
    out = render(scene, 32, 32, "torch")
    assert out["radii"][0].tolist()[:3] == [0, 0, 0] and int(out["radii"][0, 3]) > 0


def test_reference_gradients_pass_gradcheck_in_float64():
    """Three overlapping Gaussians, every input that the field optimises (the 1/255 and 0.99 thresholds are
    discontinuities; this scene has no pixel within the finite-difference step of them)."""
    width, height = 18, 17
    scene = make_scene(3, width, height, seed=4, dtype=torch.float64, size=(0.2, 0.5))
    scene["means"] = scene["means"] * 0.3
    names = ["means", "quats", "scales", "opacities", "colors"]

    def f(means, quats, scales, opacities, colors):
        out = render_gaussians(means, quats, scales, opacities, colors, scene["viewmats"], scene["Ks"], width,
                               height, background=torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), backend="torch")
        return out["image"], out["alpha"], out["depth"] * out["alpha"]

    inputs = tuple(scene[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_means2d_grad_is_readable_for_densification():
    scene = make_scene(20, 32, 32, seed=5)
    scene["means"].requires_grad_()
    out = render(scene, 32, 32, "torch")
    out["image"].sum().backward()
    grad = out["means2d"].grad
    assert grad is not None and grad.shape == (1, 20, 2)
    visible = out["radii"][0] > 0
    assert float(grad[0, visible].norm(dim=-1).max()) > 0 and float(grad[0, ~visible].abs().sum()) == 0


def test_reference_is_fast_enough_on_the_cpu():
    """64x64, 300 Gaussians, forward + backward: ~0.1 s on one core."""
    import time

    scene = make_scene(300, 64, 64, seed=6)
    for name in ("means", "scales", "colors", "opacities", "quats"):
        scene[name].requires_grad_()
    start = time.perf_counter()
    out = render(scene, 64, 64, "torch")
    (out["image"].sum() + out["depth"].sum()).backward()
    assert time.perf_counter() - start < 1.0


AGREEMENT_CHECK = """
import sys, torch
sys.path[:0] = [{tests!r}, {plugins!r}]
from test_gaussians_raster import agreement, empty_scene_check, projection_agreement
print(*agreement(width={width}, height={height}, num={num}, batch={batch}, device={device!r}))
print(*projection_agreement(width={width}, height={height}, num={num}, batch={batch}, device={device!r}))
print(*empty_scene_check({device!r}))
"""


def agreement(width, height, num, batch, device):
    """Worst differences of the triton backend from the torch reference on one random scene: image, alpha and
    alpha-weighted depth (max abs), and the gradients of a random loss on all three (max abs over max abs of
    the reference, per input), plus the share of pixels that reached the 1e-4 stopping rule."""
    shrink = (40 / num) ** (1 / 3)  # denser scenes of smaller Gaussians keep the overlap depth similar
    scene = make_scene(num, width, height, batch=batch, seed=7, device=device, size=(0.1 * shrink, 0.6 * shrink))
    scene["opacities"] = scene["opacities"].clamp(min=0.7)
    scene["opacities"][:3] = 1.0  # the 0.99 alpha clamp is active (no gradient through it)
    scene["means"][3] = torch.tensor([0.0, 0.0, -3.5], device=device)  # behind the cameras: culled
    scene["means"][4] = torch.tensor([40.0, 0.0, 0.0], device=device)  # off screen: culled
    background = torch.tensor([0.3, 0.1, 0.7], device=device)
    names = ["means", "quats", "scales", "opacities", "colors"]
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(batch, height, width, *extra, generator=g).to(device) for extra in ((3,), (), ())]
    results = {}
    for backend in ("torch", "triton"):
        leaves = {k: (v.clone().requires_grad_() if k in names else v) for k, v in scene.items()}
        out = render(leaves, width, height, backend, background)
        loss = sum((out[k] * w).sum() for k, w in zip(("image", "alpha", "depth"), weights))
        loss.backward()
        grads = {n: leaves[n].grad for n in names}
        grads["means2d"] = out["means2d"].grad
        results[backend] = ({k: out[k].detach() for k in ("image", "alpha", "depth")}, grads)
    (ref, ref_grads), (fast, fast_grads) = results["torch"], results["triton"]
    image = float((ref["image"] - fast["image"]).abs().max())
    alpha = float((ref["alpha"] - fast["alpha"]).abs().max())
    depth = float(((ref["depth"] - fast["depth"]) * ref["alpha"]).abs().max())
    grad = max(float((ref_grads[n] - fast_grads[n]).abs().max() / ref_grads[n].abs().max()) for n in ref_grads)
    stopped = float((ref["alpha"] > 1 - 2e-4).float().mean())
    with torch.no_grad():  # rendering only: the fused triton projection kernel instead of the torch ops
        no_grad = render(scene, width, height, "triton", background)
    no_grad_image = float((ref["image"] - no_grad["image"]).abs().max())
    radii = int((no_grad["radii"] != render(scene, width, height, "torch")["radii"]).sum())
    culled = int((results["torch"][1]["means"][3:5] != 0).sum() + (fast_grads["means"][3:5] != 0).sum())
    return ("image", image, "alpha", alpha, "depth", depth, "grad", grad, "stopped", stopped, "culled_grads", culled,
            "no_grad_image", no_grad_image, "radii_mismatch", radii)


def projection_agreement(width, height, num, batch, device):
    """Worst differences of the fused triton projection (forward and its backward kernel) from the torch
    projection under random upstream gradients on every output, culled Gaussians included (behind the
    cameras, and one far off screen whose Jacobian position is clamped): outputs max abs relative to the
    largest, gradients of means/quats/scales the same, and how many radii or tile boxes differ."""
    from ophav_gaussians.raster.triton_kernels import project_gaussians_triton_autograd

    scene = make_scene(num, width, height, batch=batch, seed=8, device=device)
    scene["means"][0] = torch.tensor([0.0, 0.0, -3.5], device=device)
    scene["means"][1] = torch.tensor([4.0, -1.0, 0.0], device=device)  # beyond the clamp of the Jacobian
    scene["scales"][1] = 2.0  # ... and big enough to stay on screen
    g = torch.Generator().manual_seed(3)
    upstream = [torch.randn(batch, num, *extra, generator=g).to(device) for extra in ((2,), (3,), ())]
    results = []
    for project in (project_gaussians, project_gaussians_triton_autograd):
        leaves = [scene[k].clone().requires_grad_() for k in ("means", "quats", "scales")]
        proj = project(*leaves, scene["opacities"], scene["viewmats"], scene["Ks"], width, height)
        outputs = (proj.means2d, proj.conics, proj.depths)
        sum((o * u).sum() for o, u in zip(outputs, upstream)).backward()
        results.append((outputs, [t.grad for t in leaves], proj))
    (ref_out, ref_grads, ref_proj), (out, grads, proj) = results
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return ("outputs", max(rel(a.detach(), b.detach()) for a, b in zip(out, ref_out)),
            "grads", max(rel(a, b) for a, b in zip(grads, ref_grads)),
            "visible_1", int(ref_proj.visible[0, 1]), "clamped_grad", float(ref_grads[0][1].abs().sum()),
            "mismatch", int((proj.radii != ref_proj.radii).sum() + (proj.tile_box != ref_proj.tile_box).sum()))


def empty_scene_check(device):
    """Every Gaussian behind the cameras, and no Gaussians at all: both backends return the background, alpha
    0, and zero (finite) gradients."""
    worst = 0.0
    for num in (5, 0):
        scene = make_scene(num, 20, 18, batch=2, seed=9, device=device)
        scene["means"][:, 2] = -10.0
        for backend in ("torch", "triton"):
            leaves = {k: (v.clone().requires_grad_() if k in ("means", "colors", "opacities") else v)
                      for k, v in scene.items()}
            out = render(leaves, 20, 18, backend, torch.tensor([0.2, 0.4, 0.6], device=device))
            (out["image"].sum() + out["alpha"].sum()).backward()
            background = torch.tensor([0.2, 0.4, 0.6], device=device)
            worst = max(worst, float((out["image"].detach() - background).abs().max()),
                        float(out["alpha"].detach().abs().max()), float(leaves["means"].grad.abs().sum()) if num else 0.0)
    return "empty", worst


def _parse(stdout):
    words = stdout.split()
    return {words[i]: float(words[i + 1]) for i in range(0, len(words) - 1, 2)}


def test_triton_matches_the_reference_in_the_interpreter():
    """24x20 (partial tiles), 40 Gaussians (tile lists of several chunks), B=2 in one launch. Float32
    bounds: image and alpha 1e-5 abs, alpha-weighted depth 1e-4 abs (depth ~3), gradients 1e-4 relative
    to the reference's largest (the two differ only in summation order and (1 - alpha) divisions)."""
    pytest.importorskip("triton")
    script = AGREEMENT_CHECK.format(tests=str(Path(__file__).parent), plugins=str(PLUGINS), width=24, height=20,
                                    num=40, batch=2, device="cpu")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    found = _parse(out.stdout)
    assert found["stopped"] > 0, found  # the early stop is exercised
    assert found["culled_grads"] == 0, found  # culled Gaussians get exactly zero gradient, no NaN
    assert found["image"] <= 1e-5 and found["alpha"] <= 1e-5 and found["depth"] <= 1e-4, found
    assert found["grad"] <= 1e-4, found
    assert found["no_grad_image"] <= 1e-5 and found["radii_mismatch"] == 0, found  # the fused projection
    # The fused projection and its backward kernel against autograd through the torch projection.
    assert found["visible_1"] == 1 and found["clamped_grad"] > 0, found
    assert found["outputs"] <= 1e-5 and found["grads"] <= 1e-4 and found["mismatch"] == 0, found
    assert found["empty"] == 0, found  # nothing visible / no Gaussians: background, alpha 0, zero gradients


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_triton_matches_the_reference():
    """Compiled kernels on CUDA, 128x128 with 5k Gaussians, B=2: image/alpha 1e-4 abs (GPU exp and FMA
    contraction differ from the CPU's), alpha-weighted depth 1e-3 abs, gradients 1e-3 relative to the largest
    (float32 atomics in arbitrary order over thousands of pixels)."""
    pytest.importorskip("triton")
    found = dict(zip(*[iter(agreement(width=128, height=128, num=5000, batch=2, device="cuda")
                            + projection_agreement(width=128, height=128, num=5000, batch=2, device="cuda"))] * 2))
    assert found["stopped"] > 0 and found["culled_grads"] == 0, found
    assert found["image"] <= 1e-4 and found["alpha"] <= 1e-4 and found["depth"] <= 1e-3, found
    assert found["grad"] <= 1e-3, found
    # the fused projection kernel: FMA contraction may move a radius across an integer (ceil) in rare cases
    assert found["no_grad_image"] <= 1e-4 and found["radii_mismatch"] <= 5, found
    assert found["outputs"] <= 1e-4 and found["grads"] <= 1e-3 and found["mismatch"] <= 10, found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gsplat_agrees_with_the_reference():
    """gsplat (optional, when it imports and can JIT its CUDA code) against the reference, 128x128, 5k Gaussians.
    Loose bounds: gsplat bounds each footprint by its own radius rule, so the faint fringes (alpha of a few
    1/255) of some Gaussians differ; mean image difference 2e-3, max 0.05."""
    pytest.importorskip("gsplat")
    shrink = (40 / 5000) ** (1 / 3)
    scene = make_scene(5000, 128, 128, batch=2, seed=7, device="cuda", size=(0.1 * shrink, 0.6 * shrink))
    ref = render(scene, 128, 128, "torch")
    fast = render(scene, 128, 128, "gsplat")
    diff = (ref["image"] - fast["image"]).abs()
    assert float(diff.mean()) < 2e-3 and float(diff.max()) < 0.05, (float(diff.mean()), float(diff.max()))
    assert float((ref["alpha"] - fast["alpha"]).abs().mean()) < 2e-3
