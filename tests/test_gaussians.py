"""Tests of the mesh-anchored Gaussian avatar field (plugins/ophav_gaussians, all but its rasteriser, which
tests/test_gaussians_raster.py covers): the AvatarField contract, the binding of Gaussians to triangles, the
checkpoint, densification and pruning, a short training that must learn the synthetic head, and a whole run."""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ophav_core.stages.data import RenderRequest  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import ellipsoid_mesh, render_synthetic, synthetic_tracking  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU tests are sized for one core; more threads only fight over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def head():
    tracking = synthetic_tracking(8, 32)
    frames, masks = render_synthetic(tracking)
    return tracking, frames, masks


def _field(**options):
    from ophav_gaussians.field import GaussianField

    return GaussianField(options, contracts.tiny_context())


# ---------------------------------------------------------------------------------------------- plugin


def test_plugin_registers_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        import ophav_gaussians.plugin, ophav_gaussians.options
        from ophav_core.plugins import build_host
        host = build_host([("gaussians", ophav_gaussians.plugin)], load_entry_points=False)
        spec = host.registry.get("field", "gaussians")
        assert spec.options_model().__name__ == "GaussianOptions", spec
        assert spec.requires == ("torch",)
        assert "torch" not in sys.modules, "importing the plugin imported torch"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_options_forbid_unknown_keys_and_follow_the_profile():
    from ophav_gaussians.field import GaussianField
    from ophav_gaussians.options import GaussianOptions

    contracts.check_options_model(GaussianField)
    tiny, standard = GaussianOptions().resolved("tiny"), GaussianOptions().resolved("standard")
    assert tiny.max_gaussians < standard.max_gaussians and tiny.sh_degree <= standard.sh_degree
    assert GaussianOptions(max_gaussians=77).resolved("standard").max_gaussians == 77


# ---------------------------------------------------------------------------------------------- binding


def _frame_np(a, b, c):
    """The triangle frame and size written out independently (numpy, float64)."""
    a0 = (b - a) / np.linalg.norm(b - a)
    n = np.cross(a0, c - a)
    n /= np.linalg.norm(n)
    a2 = np.cross(a0, n)
    return np.stack([a0, n, a2], axis=1), 0.5 * (np.linalg.norm(b - a) + abs(a2 @ (c - a)))


def _random_gaussians(num_faces, n, rng, shell=3):
    from ophav_gaussians.model import Gaussians

    parent = np.concatenate([rng.integers(0, num_faces, n), -np.ones(shell, np.int64)])
    total = n + shell
    bary = rng.dirichlet(np.ones(3), total)
    bary[n:] = 0
    t = lambda a: torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
    return Gaussians(parent=torch.as_tensor(parent), bary=t(bary), anchor=t(rng.normal(size=(total, 3)) * 5),
                     offset=t(rng.normal(size=(total, 3)) * 0.5), rotation=t(rng.normal(size=(total, 4))),
                     log_scale=t(rng.normal(size=(total, 3)) * 0.3), opacity=torch.zeros(total),
                     sh=torch.zeros(total, 4, 3))


def test_a_gaussian_sits_on_its_triangle_as_defined():
    from ophav_gaussians.anchors import quat_to_matrix

    rng = np.random.default_rng(0)
    verts, faces = ellipsoid_mesh()
    g = _random_gaussians(len(faces), 20, rng)
    means, quats, scales = g.place(torch.as_tensor(verts), torch.as_tensor(faces.astype(np.int64)), 0.7)
    for i in range(20):
        a, b, c = verts[faces[int(g.parent[i])]].astype(np.float64)
        frame, size = _frame_np(a, b, c)
        expected = g.bary[i].double().numpy() @ np.stack([a, b, c]) + size * frame @ g.offset[i].double().numpy()
        np.testing.assert_allclose(means[i].numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(scales[i].numpy(), size * np.exp(g.log_scale[i].numpy()), rtol=1e-5)
        rot = frame @ quat_to_matrix(g.rotation[i]).double().numpy()
        np.testing.assert_allclose(quat_to_matrix(quats[i]).numpy(), rot, atol=1e-5)
    # shell Gaussians: anchor + offset in units of the shell, head axes
    np.testing.assert_allclose(means[20:].numpy(), (g.anchor[20:] + 0.7 * g.offset[20:]).numpy(), atol=1e-5)


def test_gaussians_follow_a_rigidly_moved_and_a_deformed_mesh_exactly():
    from ophav_core.stages.motion import euler_to_matrix
    from ophav_gaussians.anchors import quat_to_matrix

    rng = np.random.default_rng(1)
    verts, faces = ellipsoid_mesh()
    faces_t = torch.as_tensor(faces.astype(np.int64))
    g = _random_gaussians(len(faces), 50, rng, shell=0)
    means, quats, scales = g.place(torch.as_tensor(verts), faces_t, 1.0)
    R = euler_to_matrix(np.array([25.0]), np.array([-10.0]), np.array([5.0]))[0].astype(np.float32)
    t, s = np.array([1.0, -2.0, 3.0], np.float32), 1.3
    moved = (s * verts @ R.T + t).astype(np.float32)
    m2, q2, s2 = g.place(torch.as_tensor(moved), faces_t, 1.0)
    np.testing.assert_allclose(m2.numpy(), s * means.numpy() @ R.T + t, atol=1e-4)
    np.testing.assert_allclose(s2.numpy(), s * scales.numpy(), rtol=1e-4)
    np.testing.assert_allclose(quat_to_matrix(q2).numpy(), R @ quat_to_matrix(quats).numpy(), atol=1e-5)
    # A non-rigid deformation (an expression): each Gaussian keeps its barycentric point and its offset in the
    # deformed triangle's own frame, in units of the deformed triangle's size.
    bent = verts.copy()
    bent[:, 2] += 0.3 * np.sin(verts[:, 0])
    bent[:, 1] *= 1.2
    m3, _, s3 = g.place(torch.as_tensor(bent), faces_t, 1.0)
    for i in range(50):
        a, b, c = bent[faces[int(g.parent[i])]].astype(np.float64)
        frame, size = _frame_np(a, b, c)
        expected = g.bary[i].double().numpy() @ np.stack([a, b, c]) + size * frame @ g.offset[i].double().numpy()
        np.testing.assert_allclose(m3[i].numpy(), expected, atol=1e-4)
        np.testing.assert_allclose(s3[i].numpy(), size * np.exp(g.log_scale[i].numpy()), rtol=1e-4)


def test_shell_gaussians_ignore_the_expression():
    rng = np.random.default_rng(2)
    verts, faces = ellipsoid_mesh()
    g = _random_gaussians(len(faces), 5, rng, shell=10)
    faces_t = torch.as_tensor(faces.astype(np.int64))
    a = g.place(torch.as_tensor(verts), faces_t, 0.5)[0]
    b = g.place(torch.as_tensor(verts * 1.1 + 0.2), faces_t, 0.5)[0]
    assert torch.equal(a[5:], b[5:]) and not torch.allclose(a[:5], b[:5])


def test_packed_placement_is_place_with_the_same_gradients():
    """Training's placement from each frame's triangles packed once equals ``place``, values and gradients."""
    from ophav_gaussians.anchors import place, place_packed, quat_multiply, quat_product_matrix, triangle_pack

    rng = np.random.default_rng(4)
    verts, faces = ellipsoid_mesh()
    meshes = torch.as_tensor(np.stack([verts, verts * 1.1 + 0.3 * np.sin(verts)]).astype(np.float32))
    faces_t = torch.as_tensor(faces.astype(np.int64))
    q, r = torch.randn(5, 4), torch.randn(5, 4)
    assert torch.allclose((quat_product_matrix(q) @ r[..., None])[..., 0], quat_multiply(q, r), atol=1e-6)
    packs = triangle_pack(meshes, faces_t, 0.7)
    assert packs.shape == (2, len(faces) + 1, 35)
    g = _random_gaussians(len(faces), 60, rng, shell=12)
    for i in range(2):
        results = []
        for packed in (False, True):
            learnt = [t.clone().requires_grad_() for t in (g.offset, g.rotation, g.log_scale)]
            args = (g.parent, g.bary, g.anchor, *learnt)
            out = place_packed(packs[i], *args) if packed else place(meshes[i], faces_t, *args, 0.7)
            sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out).backward()
            results.append((out, [t.grad for t in learnt]))
        (ref, ref_grads), (got, got_grads) = results
        for a, b in zip(ref + tuple(ref_grads), got + tuple(got_grads)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_ssim_blurs_the_five_maps_at_once_as_one_at_a_time():
    import torch.nn.functional as F

    from ophav_gaussians.losses import _gaussian_window, ssim

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(20, 24, 3, generator=gen), torch.rand(20, 24, 3, generator=gen)
    b = 0.7 * a + 0.3 * b
    w = _gaussian_window()
    kx, ky = w.view(1, 1, 1, -1).repeat(3, 1, 1, 1), w.view(1, 1, -1, 1).repeat(3, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(F.pad(t, (5, 5, 5, 5), mode="replicate"), kx, groups=3), ky, groups=3)

    x, y = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))).mean()
    assert float(ssim(a, b)) == pytest.approx(float(expected), abs=1e-6)
    assert float(ssim(a, a)) == pytest.approx(1.0, abs=1e-5) and float(ssim(a, b)) < 0.99


def fused_place_agreement(device: str) -> dict:
    """Worst differences of the fused placement + SH kernel from ``place`` + ``sh_colours`` on a randomly turned
    and bent ellipsoid (every quaternion branch taken), 300 triangle and 40 shell Gaussians, two cameras, each
    SH degree: means, quats (as rotations: a quaternion's sign is free) and scales max abs; colours max abs."""
    from ophav_core.stages.motion import euler_to_matrix
    from ophav_gaussians.anchors import matrix_to_quat, quat_to_matrix, sh_colours, triangle_frames
    from ophav_gaussians.place_kernel import place_and_shade

    rng = np.random.default_rng(5)
    verts, faces = ellipsoid_mesh()
    R = euler_to_matrix(np.array([35.0]), np.array([-50.0]), np.array([20.0]))[0]
    verts = (verts @ R.T + 0.1 * rng.normal(size=verts.shape)).astype(np.float32)
    g = _random_gaussians(len(faces), 300, rng, shell=40)
    g.sh = torch.as_tensor(rng.normal(size=(len(g), 16, 3)).astype(np.float32)) * 0.3
    g = g.to(device)
    mesh, faces_t = torch.as_tensor(verts, device=device), torch.as_tensor(faces.astype(np.int64), device=device)
    centres = torch.tensor([[0.0, 0.0, -6.0], [3.0, -1.0, -5.0]], device=device)
    frames = triangle_frames(mesh, faces_t)[0]
    m = frames
    cands = torch.stack([1 + m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                         1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], 1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1)
    branches = int(torch.unique(cands[g.parent[g.parent >= 0]].argmax(-1)).numel())
    assert torch.allclose(quat_to_matrix(matrix_to_quat(frames)), frames, atol=1e-5)
    means, quats, scales = g.place(mesh, faces_t, 0.7)
    found = {"branches": branches, "means": 0.0, "quats": 0.0, "scales": 0.0, "colours": 0.0}
    for degree in range(4):
        fm, fq, fs, fc = place_and_shade(mesh, faces_t, g.parent, g.bary, g.anchor, g.offset, g.rotation,
                                         g.log_scale, g.sh, 0.7, centres, degree)
        colours = sh_colours(g.sh, means, centres, degree)
        found["means"] = max(found["means"], float((fm - means).abs().max()))
        found["quats"] = max(found["quats"], float((quat_to_matrix(fq) - quat_to_matrix(quats)).abs().max()),
                             float((fq.norm(dim=-1) - quats.norm(dim=-1)).abs().max()))
        found["scales"] = max(found["scales"], float(((fs - scales) / scales).abs().max()))
        found["colours"] = max(found["colours"], float((fc - colours).abs().max()))
    return found


def in_the_interpreter(call: str) -> dict:
    """``call`` (an expression on this module's functions) run in a fresh Python with ``TRITON_INTERPRET=1``: the
    triton kernels on the CPU. Returns the dict it prints."""
    import ast
    import os
    from pathlib import Path

    tests = Path(__file__).parent
    script = (f"import sys\nsys.path[:0] = [{str(tests)!r}, {str(tests.parent / 'plugins')!r}]\n"
              f"import test_gaussians\nprint(test_gaussians.{call})\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_fused_placement_and_colour_match_the_torch_ops_in_the_interpreter():
    """The render path's one-launch placement + SH colour (triton, no gradients) against the PyTorch functions
    training uses, float32 bounds: positions and rotations 1e-5 (unit-sized), scales 1e-5 relative, colours 1e-5."""
    pytest.importorskip("triton")
    found = in_the_interpreter('fused_place_agreement("cpu")')
    assert found["branches"] == 4, found
    assert found["means"] <= 1e-5 and found["quats"] <= 1e-5 and found["scales"] <= 1e-5, found
    assert found["colours"] <= 1e-5, found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_placement_and_colour_match_the_torch_ops():
    """Compiled on CUDA: 1e-4 bounds (FMA contraction and the GPU's sqrt/exp differ from the CPU's)."""
    pytest.importorskip("triton")
    found = fused_place_agreement("cuda")
    assert found["branches"] == 4, found
    assert max(found["means"], found["quats"], found["scales"], found["colours"]) <= 1e-4, found


def split_step_agreement(device: str, graphs: bool, frames_checked: tuple[int, ...] = (0, 3, 5),
                         rounds: int = 2) -> dict:
    """The triton training loss in two halves (ophav_gaussians.step; CUDA graphs when ``graphs``) against the same
    loss through ``render_views``, on the synthetic head at SH degree 1 (colour gradients reach the means): worst
    relative differences of the loss, the MSE, every parameter's gradient and the screen-space gradient that
    densification reads, over ``frames_checked``, before and after each of ``rounds`` - 1 densifications (which
    recapture the graphs)."""
    from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking
    from ophav_gaussians.field import build_trainer
    from ophav_gaussians.model import LEARNT
    from ophav_gaussians.options import GaussianOptions

    tracking = _with_mouth(synthetic_tracking(8, 32))  # with a mouth pocket: its point is a vertex appended
    frames, masks = render_synthetic(tracking)
    options = GaussianOptions(cuda_graphs=graphs, sh_degree=1)
    trainer, _ = build_trainer(options, "tiny", frames, masks, tracking, device, 0, "triton", 100)
    trainer.degree = 1
    found = {"loss": 0.0, "mse": 0.0, "grads": 0.0, "means2d": 0.0, "captured": 0}

    def run(loss_of, index):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, mse, out = loss_of(index)
        loss.backward()
        return (float(loss.detach()), float(mse), {k: trainer.params[k].grad.clone() for k in LEARNT},
                out["means2d"].grad.clone(), out["radii"].clone())

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    for round_ in range(rounds):
        for index in frames_checked:
            la, ma, ga, sa, ra = run(trainer._loss_rendered, index)
            lb, mb, gb, sb, rb = run(trainer._loss_split, index)
            assert torch.equal(ra, rb)
            found["loss"] = max(found["loss"], abs(la - lb) / abs(la))
            found["mse"] = max(found["mse"], abs(ma - mb) / abs(ma))
            found["grads"] = max([found["grads"]] + [rel(gb[k], ga[k]) for k in LEARNT])
            found["means2d"] = max(found["means2d"], rel(sb, sa))
        found["captured"] += len(trainer._halves)
        with torch.no_grad():
            trainer.grad_sum.fill_(1.0)
            trainer.grad_count.fill_(1.0)
        trainer.densify_and_prune()
    found["gaussians"] = len(trainer)
    found["graphed"] = trainer._graphs  # False where a capture failed (training then goes through render_views)
    return found


def test_the_split_training_step_is_the_rendered_one_in_the_interpreter():
    """The two-halves step that CUDA graphs replay computes the same loss and gradients as the plain one (the
    triton kernels on the CPU through the interpreter; two frames, no densification, to keep it to seconds);
    float32 bound 1e-5 relative to each tensor's largest."""
    pytest.importorskip("triton")
    found = in_the_interpreter('split_step_agreement("cpu", False, (0, 5), 1)')
    assert found["captured"] == 2, found
    assert max(found["loss"], found["mse"], found["grads"], found["means2d"]) <= 1e-5, found


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphed_training_step_is_the_rendered_one():
    """Replayed as CUDA graphs, recaptured after a densification: the same loss and gradients as the plain step,
    within 1e-4 relative (the projection's backward sums with atomics, in no fixed order)."""
    pytest.importorskip("triton")
    found = split_step_agreement("cuda", True)
    assert found["graphed"] and found["captured"] == 4, found
    assert max(found["loss"], found["mse"], found["grads"], found["means2d"]) <= 1e-4, found


def test_the_shell_is_seeded_on_the_masks_hull_outside_the_face(head):
    from ophav_gaussians.model import carve_shell
    from ophav_gaussians.train import unposed_vertices

    tracking, frames, masks = head
    unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
    seeds, voxel = carve_shell(tracking, masks, unposed, 20, 0.1, 10 ** 6, np.random.default_rng(0))
    assert len(seeds) > 50
    # every seed projects inside the mask of (almost) every view
    inside = []
    for i in range(len(tracking)):
        cam = seeds @ tracking.rotation[i].T + tracking.translation[i]
        uv = np.rint(tracking.project(cam)).astype(int)
        ok = (uv[:, 0] >= 0) & (uv[:, 0] < 32) & (uv[:, 1] >= 0) & (uv[:, 1] < 32)
        inside.append(masks.alpha[i][uv[ok, 1], uv[ok, 0]] >= 0.5)
    assert np.concatenate(inside).mean() > 0.9
    # none within a voxel of the mesh
    d = np.linalg.norm(seeds[:, None] - tracking.canonical_vertices[None], axis=-1).min(1)
    assert d.min() >= voxel * 0.999
    capped, _ = carve_shell(tracking, masks, unposed, 20, 0.1, 40, np.random.default_rng(0))
    assert len(capped) == 40


# ---------------------------------------------------------------------------------------------- CPU compositing


@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "numba"])
def test_sparse_compositing_matches_the_reference_rasteriser(compiled):
    """The CPU pair compositing, in PyTorch and as Numba loops, gives the reference's images, alpha, depth and
    gradients (means, quaternions, scales, opacities, colours and the screen-space means) within float32
    rounding."""
    from ophav_gaussians.raster import render_gaussians
    from ophav_gaussians.sparse import compiled_available, render_gaussians_sparse

    if compiled and not compiled_available():
        pytest.skip("numba is not installed")

    gen = torch.Generator().manual_seed(0)
    n = 200
    means = torch.randn(n, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.5]) + torch.tensor([0.0, 0.0, 6.0])
    quats, colours = torch.randn(n, 4, generator=gen), torch.rand(n, 3, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.3 + 0.02
    opacities = torch.rand(n, generator=gen) * 0.9 + 0.05
    opacities[:20] = 0.999  # alpha clamped at 0.99 near their centres
    view = torch.eye(4)[None].repeat(2, 1, 1)
    view[1, 0, 3] = 0.3
    K = torch.tensor([[40.0, 0, 24], [0, 40, 20], [0, 0, 1]])[None].repeat(2, 1, 1)

    def run(render):
        inputs = [t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, colours)]
        out = render(*inputs, view, K, 48, 40, background=torch.tensor([1.0, 1.0, 1.0]))
        loss = (out["image"] * torch.linspace(0, 1, 3)).sum() + 0.3 * out["alpha"].sum() + 0.01 * out["depth"].sum()
        loss.backward()
        return out, [t.grad for t in inputs] + [out["means2d"].grad]

    ref, ref_grads = run(lambda *a, **k: render_gaussians(*a, backend="torch", **k))
    out, grads = run(lambda *a, **k: render_gaussians_sparse(*a, compiled=compiled, **k))
    assert ref["alpha"].max() > 0.9  # the scene covers pixels fully
    for key, tol in (("image", 1e-5), ("alpha", 1e-5), ("depth", 1e-3)):
        assert (out[key] - ref[key]).abs().max() < tol, key
    assert torch.equal(out["radii"], ref["radii"])
    for a, b in zip(grads, ref_grads):
        assert ((a - b).abs().max() / b.abs().max()) < 1e-4


def test_a_failed_compilation_falls_back_to_the_pytorch_compositing(monkeypatch):
    """Where Numba cannot compile the loops, a warning says so and the PyTorch pairs composite, from then on."""
    numba_compositing = pytest.importorskip("ophav_gaussians.numba_compositing")
    from ophav_gaussians import sparse

    def broken(*args, **kwargs):
        raise numba_compositing.NumbaError("no LLVM here")

    monkeypatch.setattr(numba_compositing, "composite_numba", broken)
    monkeypatch.setattr(sparse, "_COMPILE_FAILED", [])
    means = torch.tensor([[0.0, 0.0, 5.0], [0.3, 0.1, 6.0]])
    args = (means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.5), torch.tensor([0.8, 0.6]),
            torch.rand(2, 3), torch.eye(4)[None], torch.tensor([[[20.0, 0, 8], [0, 20, 8], [0, 0, 1]]]), 16, 16)
    with pytest.warns(RuntimeWarning, match="no LLVM here"):
        out = sparse.render_gaussians_sparse(*args)
    assert not sparse.compiled_available()
    plain = sparse.render_gaussians_sparse(*args, compiled=False)
    assert torch.equal(out["image"], plain["image"]) and out["alpha"].max() > 0.5


# ---------------------------------------------------------------------------------------------- the component


@pytest.mark.parametrize("backend, resolved", [("auto", "sparse"), ("torch", "torch")])
def test_field_contract(tmp_path, backend, resolved):
    ckpt = contracts.check_field(_field(backend=backend), tmp_path)
    assert ckpt.info["total_iterations"] == 10 and ckpt.info["backend"] == resolved
    assert ckpt.info["gaussians_on_mesh"] > 0 and ckpt.info["gaussians_shell"] > 0


def test_checkpoint_is_one_safe_file_and_reloads_exactly(tmp_path, head):
    from ophav_gaussians.field import GaussianField

    tracking, frames, masks = head
    field = _field()
    ckpt = field.fit(frames, masks, tracking, tmp_path / "avatar.ckpt", iterations=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar.ckpt"]  # no temporary file left behind
    raw = torch.load(ckpt.path, weights_only=True, map_location="cpu")

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))

    assert plain(raw) and raw["format"] == "ophav-gaussians"
    assert raw["info"]["iterations"] == 3 and raw["gaussians"]["offset"].shape[1] == 3
    reloaded = GaussianField({}, contracts.tiny_context()).load(ckpt.path)
    assert np.array_equal(reloaded.template.canonical_vertices, tracking.canonical_vertices)
    assert np.array_equal(reloaded.template.faces, tracking.faces)
    request = RenderRequest.from_tracking(tracking, np.array([1, 2]))
    first = field.render(ckpt, request)
    again = GaussianField({}, contracts.tiny_context()).render(reloaded, request)
    assert np.array_equal(first.rgb, again.rgb) and np.array_equal(first.depth, again.depth)
    bigger = field.render(ckpt, RenderRequest.from_tracking(tracking, np.array([1]), resolution=(48, 40)))
    assert bigger.rgb.shape == (1, 40, 48, 3) and bigger.alpha.shape == (1, 40, 48)
    covered = first.alpha > 0.5
    assert covered.any() and (first.depth[covered] > 40).all()  # camera z of a head 60 units away


def test_same_inputs_give_the_same_checkpoint(tmp_path, head):
    from ophav_gaussians.field import read_checkpoint

    tracking, frames, masks = head
    a = _field().fit(frames, masks, tracking, tmp_path / "a.ckpt", iterations=3)
    b = _field().fit(frames, masks, tracking, tmp_path / "b.ckpt", iterations=3)
    wa, wb = read_checkpoint(a.path)["gaussians"], read_checkpoint(b.path)["gaussians"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_continuing_needs_the_same_topology_and_iterations_follow_the_profile(tmp_path, head):
    from ophav_core.errors import UsageError

    tracking, frames, masks = head
    field = _field()
    first = field.fit(frames, masks, tracking, tmp_path / "a.ckpt")
    second = field.fit(frames, masks, tracking, tmp_path / "b.ckpt", init=first)
    profile = field.context.profile
    assert first.info["iterations"] == profile.fit_iterations
    assert second.info["total_iterations"] == profile.fit_iterations + profile.refit_iterations
    other = synthetic_tracking(8, 32, num_expressions=3)
    frames2, masks2 = render_synthetic(other)
    with pytest.raises(UsageError, match="expression"):
        field.fit(frames2, masks2, other, tmp_path / "c.ckpt", init=first, iterations=1)


# ---------------------------------------------------------------------------------------------- the mouth pocket


def test_the_mouth_pocket_replaces_mediapipes_opening_with_a_fan_behind_the_lips():
    from ophav_gaussians.mouth import BACK, mouth_pocket
    from ophav_mediapipe.mesh import topology

    topo = topology()
    faces, loop, canonical = topo.faces.astype(np.int64), topo.groups["lips_inner"], topo.template.astype(np.float64)
    on_loop = np.isin(faces, loop)
    opening = on_loop.all(axis=1)
    assert opening.sum() > 0  # MediaPipe's mesh spans the opening with a strip between the lips
    pocket = mouth_pocket(faces, loop, canonical, depth=0.5)
    assert len(pocket.faces) == len(faces) - opening.sum() + len(loop) and pocket.pocket_faces == len(loop)
    kept = pocket.faces[:-len(loop)]
    assert not np.isin(kept, loop).all(axis=1).any()  # no triangle left across the opening
    assert np.array_equal(np.sort(kept, 1), np.sort(faces[~opening], 1))  # every other triangle kept as it was
    extended = pocket.extend(canonical)
    assert extended.shape == (len(canonical) + 1, 3) and np.array_equal(extended[:-1], canonical)
    width = np.linalg.norm(canonical[pocket.corners[0]] - canonical[pocket.corners[1]])
    assert np.allclose(extended[-1], canonical[loop].mean(0) + 0.5 * width * BACK)
    fan = extended[pocket.faces[-len(loop):]]
    normals = np.cross(fan[:, 1] - fan[:, 0], fan[:, 2] - fan[:, 0])
    assert (normals @ BACK < 0).all()  # facing out of the pocket, as the face's triangles face the camera
    # It follows the lips: the lower lip down by a quarter of the mouth's width moves the back point down by half
    # that (the contour's centroid; the width is the same) and keeps it behind.
    opened = canonical.copy()
    lower = loop[canonical[loop, 1] > canonical[loop, 1].mean()]
    opened[lower, 1] += 0.25 * width
    moved = pocket.extend(opened)[-1] - extended[-1]
    assert np.allclose(moved, [0.0, 0.25 * width * len(lower) / len(loop), 0.0], atol=1e-9)
    as_torch = pocket.extend(torch.as_tensor(np.stack([canonical, opened])))
    assert torch.allclose(as_torch[1], torch.as_tensor(pocket.extend(opened)))
    assert mouth_pocket(faces, None, canonical, 0.5) is None
    # A contour carried over from another topology may repeat a vertex: one fan triangle per distinct edge.
    assert np.array_equal(mouth_pocket(faces, np.repeat(loop, 2), canonical, 0.5).faces, pocket.faces)


def _with_mouth(tracking):
    """The synthetic head with an inner-lip contour at its front, below the middle: the six vertices around two
    quads (four triangles), which play MediaPipe's mouth-opening strip."""
    import dataclasses

    rings, segments = 12, 16
    vertex = lambda ring, j: 1 + (ring - 1) * segments + j % segments  # noqa: E731 (ellipsoid_mesh's layout)
    loop = np.array([vertex(7, -1), vertex(7, 0), vertex(7, 1), vertex(8, 1), vertex(8, 0), vertex(8, -1)])
    assert len(tracking.canonical_vertices) == 2 + (rings - 1) * segments
    return dataclasses.replace(tracking, semantic={**tracking.semantic, "lips_inner": loop})


def test_the_field_trains_renders_continues_and_reloads_with_the_mouth_pocket(tmp_path, head):
    from ophav_gaussians.field import GaussianField, read_checkpoint

    tracking, frames, masks = head
    mouthed = _with_mouth(tracking)
    field = _field()
    ckpt = field.fit(frames, masks, mouthed, tmp_path / "a.ckpt", iterations=5)
    raw = read_checkpoint(ckpt.path)
    assert raw["options"]["mouth_pocket"] is True
    faces = GaussianField({}, contracts.tiny_context())._loaded(ckpt.path).faces
    assert len(faces) == len(tracking.faces) - 4 + 6
    parent = raw["gaussians"]["parent"]
    assert ((parent >= len(faces) - 6) & (parent < len(faces))).sum() >= 6  # Gaussians inside the mouth
    request = RenderRequest.from_tracking(mouthed, np.array([1, 2]))
    first = field.render(ckpt, request)
    assert np.isfinite(first.depth).all() and (first.alpha > 0.5).any()
    again = field.fit(frames, masks, mouthed, tmp_path / "b.ckpt", init=ckpt, iterations=2)
    assert len(GaussianField({}, contracts.tiny_context())._loaded(again.path).faces) == len(faces)
    # Trained without it, a checkpoint keeps the tracker's triangles, also when it predates the option.
    plain = _field(mouth_pocket=False).fit(frames, masks, mouthed, tmp_path / "c.ckpt", iterations=5)
    before = _field().render(plain, request)
    old = torch.load(plain.path, weights_only=True)
    del old["options"]["mouth_pocket"], old["options"]["mouth_depth"]
    torch.save(old, tmp_path / "old.ckpt")
    loaded = GaussianField({}, contracts.tiny_context())
    assert len(loaded._loaded(tmp_path / "old.ckpt").faces) == len(tracking.faces)
    after = loaded.render(loaded.load(tmp_path / "old.ckpt"), request)
    assert np.array_equal(before.rgb, after.rgb)


def _trainer(head, **options):
    from ophav_gaussians.field import build_trainer
    from ophav_gaussians.options import GaussianOptions

    tracking, frames, masks = head
    trainer, _ = build_trainer(GaussianOptions(**options), "tiny", frames, masks, tracking, "cpu", 0, "torch", 100)
    return trainer


def test_densify_clones_small_splits_large_and_prunes_faint_gaussians(head):
    trainer = _trainer(head, percent_dense=0.01)
    n = len(trainer)
    opt = trainer.options
    with torch.no_grad():
        trainer.params["log_scale"][:5] = -6.0  # much smaller than a triangle: these are cloned
        size = trainer._world_size(trainer.params["log_scale"])
        large = size > opt.percent_dense * trainer.head_size
        small_idx = torch.nonzero(~large).squeeze(1)[:5]
        large_idx = torch.nonzero(large).squeeze(1)[:7]
        assert small_idx.numel() == 5 and large_idx.numel() == 7
        trainer.grad_sum.zero_()
        trainer.grad_count.fill_(1.0)
        trainer.grad_sum[small_idx] = 10 * opt.grad_threshold
        trainer.grad_sum[large_idx] = 10 * opt.grad_threshold
        faint = torch.arange(n - 4, n)  # shell Gaussians at the end, not among the densified
        assert not np.intersect1d(faint.numpy(), np.concatenate([small_idx.numpy(), large_idx.numpy()])).size
        trainer.params["opacity"][faint] = -20.0
        parent_offsets = trainer.params["offset"][large_idx].clone()
        parent_scales = trainer.params["log_scale"][large_idx].clone()
        clone_values = trainer.params["sh"][small_idx].clone()
    trainer.densify_and_prune()
    # +5 clones, +7 splits (2 children replace each parent), -4 pruned
    assert len(trainer) == n + 5 + 7 - 4
    assert trainer.params["offset"].shape[0] == len(trainer) == trainer.ema["offset"].shape[0]
    assert trainer.fixed["parent"].shape[0] == len(trainer) and trainer.grad_sum.shape[0] == len(trainer)
    new = slice(len(trainer) - 5 - 14, len(trainer))
    assert torch.equal(trainer.params["sh"][new][:5], clone_values)  # the clones come first, exact copies
    children_scales = trainer.params["log_scale"][new][5:]
    np.testing.assert_allclose(children_scales.detach().numpy(),
                               torch.cat([parent_scales, parent_scales]).numpy() - math.log(1.6), atol=1e-6)
    moved = (trainer.params["offset"][new][5:] - torch.cat([parent_offsets, parent_offsets])).norm(dim=-1)
    assert (moved > 0).all()
    assert (torch.sigmoid(trainer.params["opacity"]) >= opt.min_opacity).all()
    # the Adam state follows the new rows: a step runs
    trainer.step()


def test_densification_stops_at_the_budget(head):
    trainer = _trainer(head, max_gaussians=520)
    n = len(trainer)
    assert n < 520
    with torch.no_grad():
        trainer.grad_sum.fill_(1.0)
        trainer.grad_count.fill_(1.0)
    trainer.densify_and_prune()
    assert len(trainer) <= 520 and len(trainer) > n


def _psnr_and_alpha_error(field, ckpt, tracking, frames, masks):
    index = np.arange(0, len(tracking), 2)
    out = field.render(ckpt, RenderRequest.from_tracking(tracking, index))
    alpha = masks.alpha[index][..., None]
    target = frames.frames[index] / 255.0 * alpha + (1 - alpha)  # white background
    mse = float(((out.rgb / 255.0 - target) ** 2).mean())
    return -10 * np.log10(mse), float(np.abs(out.alpha - masks.alpha[index]).mean())


def test_training_learns_the_synthetic_head(tmp_path, head):
    tracking, frames, masks = head
    field = _field()
    start = field.fit(frames, masks, tracking, tmp_path / "start.ckpt", iterations=0)
    trained = field.fit(frames, masks, tracking, tmp_path / "trained.ckpt", iterations=60)
    psnr0, alpha0 = _psnr_and_alpha_error(field, start, tracking, frames, masks)
    psnr1, alpha1 = _psnr_and_alpha_error(field, trained, tracking, frames, masks)
    assert psnr1 > psnr0 + 3.0, (psnr0, psnr1)
    assert alpha1 < 0.7 * alpha0, (alpha0, alpha1)
    assert trained.info["densified"] > 0 and trained.info["gaussians"] <= 1500


# ---------------------------------------------------------------------------------------------- a whole run


def test_run_end_to_end_with_the_gaussian_field(fakes_env, portrait_file, tmp_path, capsys):
    from ophav_core.cli import main

    out = tmp_path / "r"
    argv = ["run", str(portrait_file), "--out", str(out), "--image2video", "fake", "--segmenter", "fake",
            "--tracker", "fake", "--field", "gaussians", "--restorer", "fake", "--profile", "tiny",
            "--device", "cpu", "-q", "--rounds", "1", "--set", "field.iterations=6"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0, capsys.readouterr().err
    assert (out / "avatar/avatar.ckpt").is_file() and (out / "round1/avatar.ckpt").is_file()
    raw = torch.load(out / "avatar/avatar.ckpt", weights_only=True)
    assert raw["format"] == "ophav-gaussians" and raw["info"]["continued_from"]
    with pytest.raises(SystemExit) as info:
        main(["render", str(out / "avatar/avatar.ckpt"), "--views", "turntable", "--size", "32", "--out",
              str(tmp_path / "turn.mp4"), "-q"])
    assert info.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "turn.mp4").stat().st_size > 0
