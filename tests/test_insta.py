"""Tests of the INSTA avatar field (plugins/ophav_insta): hash encoding backends, deformation, volume rendering,
the AvatarField contract, checkpoints and a short training that must learn the synthetic head."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ophav_core.errors import UsageError  # noqa: E402
from ophav_core.stages.data import RenderRequest  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import ellipsoid_mesh, render_synthetic, synthetic_tracking  # noqa: E402

# Small enough for a CPU: ~30 ms per iteration on one core.
TINY = dict(log2_table=12, levels=8, finest_resolution=128, hidden_dim=32, batch_rays=256, samples_per_ray=24,
            frames_per_batch=4, candidate_grid=8, candidates=8, occupancy_resolution=16)


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
    from ophav_insta.field import InstaField

    return InstaField({**TINY, **options}, contracts.tiny_context())


# ---------------------------------------------------------------------------------------------- plugin


def test_plugin_registers_without_importing_torch():
    code = textwrap.dedent("""
        import sys
        import ophav_insta.plugin, ophav_insta.options
        from ophav_core.plugins import build_host
        host = build_host([("insta", ophav_insta.plugin)], load_entry_points=False)
        spec = host.registry.get("field", "insta")
        assert spec.options_model().__name__ == "InstaOptions", spec
        assert spec.requires == ("torch",) and spec.extra == "insta"
        assert "torch" not in sys.modules, "importing the plugin imported torch"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_options_forbid_unknown_keys():
    from ophav_insta.field import InstaField

    contracts.check_options_model(InstaField)


# ---------------------------------------------------------------------------------------------- hash grid


def test_layout_follows_tiny_cuda_nn_rules():
    from ophav_insta.hashgrid import HashGridLayout

    lay = HashGridLayout(levels=16, features=2, log2_table=19, base_resolution=16, finest_resolution=2048)
    assert lay.resolutions[0] == 16 and lay.sizes[0] == 16 ** 3 and not lay.hashed[0]
    assert lay.resolutions[-1] == 2048 and lay.sizes[-1] == 1 << 19 and lay.hashed[-1]
    assert (lay.sizes % 8 == 0).all() and (lay.sizes <= 1 << 19).all()
    assert np.array_equal(lay.hashed, lay.resolutions.astype(float) ** 3 > lay.sizes)
    assert lay.offsets[-1] == lay.sizes.sum() == lay.entries
    assert np.all(np.diff(lay.resolutions) > 0)


def test_dense_levels_interpolate_a_linear_function_exactly():
    """A table holding a linear function of the grid vertex is reproduced exactly by trilinear interpolation."""
    from ophav_insta.hashgrid import HashGridLayout, hash_encode_torch

    lay = HashGridLayout(levels=3, features=2, log2_table=16, base_resolution=4, finest_resolution=16)
    assert not lay.hashed.any()
    table = torch.zeros(lay.entries, 2, dtype=torch.float64)
    for level in range(lay.levels):
        res = int(lay.resolutions[level])
        idx = torch.arange(res ** 3)
        gx, gy, gz = idx % res, (idx // res) % res, idx // (res * res)
        rows = slice(int(lay.offsets[level]), int(lay.offsets[level]) + res ** 3)
        table[rows, 0] = (1.0 * gx + 2.0 * gy - 0.5 * gz).double()
        table[rows, 1] = 3.0
    # tiny-cuda-nn's dense levels alias the last vertex row (x * scale + 1.5 >= resolution): stay below it.
    x = torch.rand(200, 3, generator=torch.Generator().manual_seed(1)) * 0.8
    out = hash_encode_torch(x, table, lay)
    for level in range(lay.levels):
        pos = x.double() * float(lay.scales[level]) + 0.5
        expect = pos[:, 0] + 2 * pos[:, 1] - 0.5 * pos[:, 2]
        assert torch.allclose(out[:, 2 * level], expect, atol=1e-4)
        assert torch.allclose(out[:, 2 * level + 1], torch.full_like(expect, 3.0), atol=1e-9)


def test_reference_gradient_spreads_each_point_with_unit_weight():
    from ophav_insta.hashgrid import HashGrid, HashGridLayout

    lay = HashGridLayout(levels=4, features=2, log2_table=8, base_resolution=4, finest_resolution=64)
    assert lay.hashed.any() and not lay.hashed.all()
    grid = HashGrid(lay, "torch")
    grid.reset_parameters(torch.Generator().manual_seed(0))
    x = torch.rand(100, 3, generator=torch.Generator().manual_seed(2))
    grid(x).sum().backward()
    for level in range(lay.levels):
        rows = grid.table.grad[int(lay.offsets[level]):int(lay.offsets[level + 1])]
        assert torch.allclose(rows.sum(0), torch.full((2,), 100.0), atol=1e-3)


TRITON_CHECK = """
import os, sys, torch
from ophav_insta.hashgrid import HashGridLayout, LevelTables, hash_encode_torch
from ophav_insta.hashgrid_triton import hash_encode_triton
lay = HashGridLayout(levels=5, features=2, log2_table=9, base_resolution=4, finest_resolution=64)
assert lay.hashed.any() and not lay.hashed.all()
g = torch.Generator().manual_seed(0)
x = torch.rand(300, 3, generator=g)
table = torch.randn(lay.entries, 2, generator=g).requires_grad_()
gout = torch.randn(300, lay.output_dim, generator=g)
ref = hash_encode_torch(x, table, lay)
(ref * gout).sum().backward()
gref, table.grad = table.grad.clone(), None
out = hash_encode_triton(x, table, LevelTables.build(lay, "cpu"), lay)
(out * gout).sum().backward()
print("forward", float((out - ref).abs().max()), "backward", float((table.grad - gref).abs().max()))
"""


def test_triton_kernels_match_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    forward, backward = float(words[words.index("forward") + 1]), float(words[words.index("backward") + 1])
    assert forward < 1e-5 and backward < 1e-4, out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_agree_with_the_reference():
    from ophav_insta.hashgrid import HashGrid, HashGridLayout, tcnn_available, triton_available

    lay = HashGridLayout(levels=16, features=2, log2_table=19, base_resolution=16, finest_resolution=2048)
    backends = [b for b, ok in (("triton", triton_available()), ("tcnn", tcnn_available())) if ok]
    if not backends:
        pytest.skip("neither triton nor tinycudann is importable")
    x = torch.rand(1 << 17, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    gout = torch.randn(x.shape[0], lay.output_dim, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    reference = HashGrid(lay, "torch").cuda()
    with torch.no_grad():
        reference.table.normal_(generator=torch.Generator("cuda").manual_seed(2))
    ref = reference(x)
    (ref * gout).sum().backward()
    for backend in backends:
        grid = HashGrid(lay, backend).cuda()
        with torch.no_grad():
            grid.table.copy_(reference.table)
        out = grid(x)
        (out * gout).sum().backward()
        scale = float(ref.abs().max())
        assert float((out - ref).abs().max()) <= 1e-5 * scale, backend
        grad_scale = float(reference.table.grad.abs().max())
        assert float((grid.table.grad - reference.table.grad).abs().max()) <= 1e-4 * grad_scale, backend


# ---------------------------------------------------------------------------------------------- deformation


def test_closest_point_on_triangle_matches_dense_sampling():
    from ophav_insta.deform import closest_point_on_triangle

    g = torch.Generator().manual_seed(3)
    a, b, c = torch.randn(3, 50, 3, generator=g).unbind(0)
    p = torch.randn(50, 3, generator=g) * 2
    q, bary = closest_point_on_triangle(p, a, b, c)
    assert torch.allclose(bary.sum(-1), torch.ones(50), atol=1e-5) and (bary >= -1e-5).all()
    s = torch.linspace(0, 1, 201)
    u, v = torch.meshgrid(s, s, indexing="ij")
    ok = (u + v) <= 1
    u, v = u[ok], v[ok]
    samples = a[:, None] + u[None, :, None] * (b - a)[:, None] + v[None, :, None] * (c - a)[:, None]
    brute = (samples - p[:, None]).norm(dim=-1).amin(dim=1)
    mine = (q - p).norm(dim=-1)
    assert (mine <= brute + 1e-5).all()
    assert (brute - mine).max() < 0.05  # the sampling is only so fine


def _deformer(tracking, grid=12, k=16, near=0.3, far=1.5):
    from ophav_insta.deform import MeshDeformer, unposed_vertices

    unposed = unposed_vertices(tracking.vertices, tracking.rotation, tracking.translation)
    deformer = MeshDeformer.build(tracking.canonical_vertices, tracking.faces, unposed, grid, k, near, far, "cpu")
    return deformer, torch.as_tensor(unposed)


def test_zero_expression_deforms_rigidly():
    tracking = synthetic_tracking(2, 32)
    tracking.expression[:] = 0
    tracking.vertices = tracking.mesh_for(tracking.rotation, tracking.translation, tracking.expression)
    deformer, unposed = _deformer(tracking)
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(4)) * 8
    frame = torch.randint(0, 2, (500,), generator=torch.Generator().manual_seed(5))
    x_c, closeness = deformer.deform(x, frame, unposed)
    assert torch.allclose(x_c, x, atol=1e-4)
    assert (closeness > 0.99).any() and (closeness < 0.01).any()  # some points near the mesh, some far


def test_points_on_and_above_the_frame_mesh_map_to_the_canonical_mesh():
    from ophav_insta.deform import triangle_frames

    tracking = synthetic_tracking(2, 32)
    deformer, unposed = _deformer(tracking)
    faces = torch.as_tensor(tracking.faces).long()
    canon = torch.as_tensor(tracking.canonical_vertices)
    g = torch.Generator().manual_seed(6)
    face = torch.randint(0, faces.shape[0], (300,), generator=g)
    bary = torch.rand(300, 3, generator=g) + 0.2
    bary = bary / bary.sum(-1, keepdim=True)  # well inside the triangle: the nearest one is unambiguous
    tri = unposed[1][faces[face]]
    on_surface = (bary[:, :, None] * tri).sum(1)
    normal = triangle_frames(tri[:, 0], tri[:, 1], tri[:, 2])[:, 2]
    lift = 0.1  # below `near`: fully attached to the triangle
    x = on_surface + lift * normal
    x_c, closeness = deformer.deform(x, torch.ones(300, dtype=torch.long), unposed)
    canon_tri = canon[faces[face]]
    expect = (bary[:, :, None] * canon_tri).sum(1) + lift * triangle_frames(*canon_tri.unbind(1))[:, 2]
    assert (closeness == 1).float().mean() > 0.97
    good = (x_c - expect).norm(dim=-1) < 1e-3
    assert good.float().mean() > 0.95, f"{good.float().mean():.3f} of the points land on their canonical twin"
    moved = (on_surface - (bary[:, :, None] * canon_tri).sum(1)).norm(dim=-1)
    assert moved.max() > 0.3, "the test needs an expression that really moves the mesh"


def test_far_points_move_rigidly():
    tracking = synthetic_tracking(2, 32)
    deformer, unposed = _deformer(tracking, far=1.5)
    direction = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(7)), dim=-1)
    x = direction * 16.0  # the ellipsoid's radii are at most 10
    x_c, closeness = deformer.deform(x, torch.zeros(200, dtype=torch.long), unposed)
    assert torch.equal(x_c, x) and (closeness == 0).all()


def _brute_force_distance(points, mesh, faces):
    from ophav_insta.deform import closest_point_on_triangle

    tri = mesh[torch.as_tensor(faces).long()]
    q, _ = closest_point_on_triangle(points[:, None], tri[None, :, 0], tri[None, :, 1], tri[None, :, 2])
    return (points[:, None] - q).norm(dim=-1).amin(dim=1)


def test_candidate_grid_finds_the_nearest_triangle():
    tracking = synthetic_tracking(2, 32)
    deformer, unposed = _deformer(tracking, grid=12, k=16)
    g = torch.Generator().manual_seed(8)
    mesh = unposed[1]
    x = mesh[torch.randint(0, mesh.shape[0], (400,), generator=g)] * (1 + 0.08 * torch.randn(400, 1, generator=g))
    near = deformer.nearest(x, torch.ones(400, dtype=torch.long), unposed)
    brute = _brute_force_distance(x, mesh, tracking.faces)
    exact = (near.distance - brute).abs() < 1e-4
    assert near.inside.all() and exact.float().mean() > 0.97, f"exact for {exact.float().mean():.3f}"


def test_candidate_grid_scales_to_a_flame_size_mesh():
    """~10k triangles (FLAME-size): the grid is built from bounding-sphere bounds, the query tests K per point."""
    import time

    from ophav_insta.deform import MeshDeformer

    verts, faces = ellipsoid_mesh(rings=72, segments=72)
    assert faces.shape[0] > 10000
    start = time.perf_counter()
    deformer = MeshDeformer.build(verts, faces, np.zeros((0,) + verts.shape, np.float32), 16, 8, 0.2, 1.0, "cpu")
    built = time.perf_counter() - start
    g = torch.Generator().manual_seed(9)
    mesh = torch.as_tensor(verts)
    x = mesh[torch.randint(0, len(verts), (200,), generator=g)] * (1 + 0.05 * torch.randn(200, 1, generator=g))
    near = deformer.nearest(x, torch.zeros(200, dtype=torch.long), mesh[None])
    error = near.distance - _brute_force_distance(x, mesh, faces)
    assert (error > -1e-4).all()  # never closer than the true nearest triangle
    assert float(error.mean()) < 0.01 * 20, "mean error above 1% of the mesh size"
    assert built < 20.0, f"building the candidate grid took {built:.1f} s"


# ---------------------------------------------------------------------------------------------- rendering


def _sphere_field(radius=0.3, density=200.0):
    def field(x, frame, direction):
        inside = x.norm(dim=-1) < radius
        return inside.float() * density, (x * 0.5 + 0.5).clamp(0, 1)
    return field


def _sphere_rays(n=64):
    from ophav_insta.render import make_rays

    g = torch.Generator().manual_seed(10)
    u, v = 14 + torch.rand(n, generator=g) * 12, 14 + torch.rand(n, generator=g) * 12  # inside the box
    K_inv = torch.linalg.inv(torch.tensor([[40.0, 0, 20], [0, 40.0, 20], [0, 0, 1]]))[None]
    box = torch.tensor([-0.5, -0.5, -0.5]), torch.tensor([0.5, 0.5, 0.5])
    rays = make_rays(u, v, torch.zeros(n, dtype=torch.long), K_inv, torch.eye(3)[None], torch.tensor([[0, 0, 3.0]]), *box)
    return rays, box


def test_rays_meet_the_head_box():
    rays, (lo, hi) = _sphere_rays()
    assert rays.hit.all()
    entry = rays.origin + rays.near[:, None] * rays.direction
    assert torch.allclose(entry[:, 2], torch.full_like(entry[:, 2], -0.5), atol=1e-4)  # through the front face
    assert (rays.far > rays.near).all() and torch.allclose(rays.direction[:, 2], torch.ones(len(rays)))


def test_block_marching_equals_single_pass_and_skipping_changes_nothing():
    from ophav_insta.render import OccupancyGrid, march_render

    rays, (lo, hi) = _sphere_rays()
    field = _sphere_field()
    occupancy = OccupancyGrid(16, lo, 1.0, dilation=1)
    full = march_render(field, occupancy, rays, 64, 1.0, block=64, min_transmittance=0.0)
    blocks = march_render(field, occupancy, rays, 64, 1.0, block=8, min_transmittance=0.0)
    assert torch.allclose(full.rgb, blocks.rgb, atol=1e-5) and torch.allclose(full.opacity, blocks.opacity, atol=1e-5)
    assert full.opacity.max() > 0.99 and full.opacity.min() < 0.01  # some rays hit the sphere, some miss it

    def density(unit):
        return field(unit - 0.5, None, None)[0]

    occupancy.update(density, step=1 / 64, threshold=0.01, decay=0.0, jitter=False)
    assert 0.0 < occupancy.fraction() < 0.5
    skipped = march_render(field, occupancy, rays, 64, 1.0, block=8, min_transmittance=1e-4)
    assert torch.allclose(full.rgb, skipped.rgb, atol=1e-3) and torch.allclose(full.opacity, skipped.opacity, atol=1e-3)
    assert skipped.samples < 0.5 * full.samples


def test_distortion_loss_matches_the_quadratic_definition():
    from ophav_insta.render import distortion_loss

    w = torch.rand(5, 16, generator=torch.Generator().manual_seed(11))
    s = (torch.arange(16) + 0.5) / 16
    brute = (w[:, :, None] * w[:, None, :] * (s[:, None] - s[None, :]).abs()).sum((1, 2)) + (w ** 2).sum(1) / (3 * 16)
    assert torch.allclose(distortion_loss(w), brute, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the component


def test_field_contract(tmp_path):
    ckpt = contracts.check_field(_field(), tmp_path)
    assert ckpt.info["total_iterations"] == 10 and ckpt.info["backend"] == "torch"


def test_checkpoint_is_one_safe_file_and_reloads_exactly(tmp_path, head):
    from ophav_insta.field import InstaField

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

    assert plain(raw)
    assert raw["info"]["iterations"] == 3 and raw["config"]["log2_table"] == 12
    reloaded = InstaField(TINY, contracts.tiny_context()).load(ckpt.path)
    assert np.array_equal(reloaded.template.canonical_vertices, tracking.canonical_vertices)
    assert np.array_equal(reloaded.template.faces, tracking.faces)
    assert reloaded.template.semantic.keys() == tracking.semantic.keys()
    request = RenderRequest.from_tracking(tracking, np.array([1]))
    first = field.render(ckpt, request)
    again = InstaField(TINY, contracts.tiny_context()).render(reloaded, request)
    assert np.array_equal(first.rgb, again.rgb) and np.array_equal(first.depth, again.depth)
    bigger = field.render(ckpt, RenderRequest.from_tracking(tracking, np.array([1]), resolution=(48, 40)))
    assert bigger.rgb.shape == (1, 40, 48, 3) and bigger.alpha.shape == (1, 40, 48)


def test_same_inputs_give_the_same_checkpoint(tmp_path, head):
    from ophav_insta.field import read_checkpoint

    tracking, frames, masks = head
    a = _field().fit(frames, masks, tracking, tmp_path / "a.ckpt", iterations=4)
    b = _field().fit(frames, masks, tracking, tmp_path / "b.ckpt", iterations=4)
    wa, wb = read_checkpoint(a.path)["field"], read_checkpoint(b.path)["field"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = _field().fit(frames, masks, tracking, tmp_path / "c.ckpt", iterations=5)
    assert not torch.equal(read_checkpoint(c.path)["field"]["encoding.table"], wa["encoding.table"])


def test_continuing_needs_the_same_topology(tmp_path, head):
    tracking, frames, masks = head
    field = _field()
    first = field.fit(frames, masks, tracking, tmp_path / "a.ckpt", iterations=1)
    other = synthetic_tracking(8, 32, num_expressions=3)
    frames2, masks2 = render_synthetic(other)
    with pytest.raises(UsageError, match="expression"):
        field.fit(frames2, masks2, other, tmp_path / "b.ckpt", init=first, iterations=1)


def test_iterations_follow_the_profile(tmp_path, head):
    tracking, frames, masks = head
    field = _field()
    first = field.fit(frames, masks, tracking, tmp_path / "a.ckpt")
    second = field.fit(frames, masks, tracking, tmp_path / "b.ckpt", init=first)
    profile = field.context.profile
    assert first.info["iterations"] == profile.fit_iterations
    assert second.info["iterations"] == profile.refit_iterations
    assert second.info["total_iterations"] == profile.fit_iterations + profile.refit_iterations


def _psnr_and_alpha_error(field, ckpt, tracking, frames, masks):
    index = np.arange(0, len(tracking), 2)
    out = field.render(ckpt, RenderRequest.from_tracking(tracking, index))
    alpha = masks.alpha[index][..., None]
    target = frames.frames[index] / 255.0 * alpha + (1 - alpha)  # white background
    mse = float(((out.rgb / 255.0 - target) ** 2).mean())
    return -10 * np.log10(mse), float(np.abs(out.alpha - masks.alpha[index]).mean())


def test_training_learns_the_synthetic_head(tmp_path, head):
    tracking, frames, masks = head
    field = _field(log2_table=14, finest_resolution=256, occupancy_warmup=60, candidates=4)
    start = field.fit(frames, masks, tracking, tmp_path / "start.ckpt", iterations=0)
    trained = field.fit(frames, masks, tracking, tmp_path / "trained.ckpt", iterations=150)
    psnr0, alpha0 = _psnr_and_alpha_error(field, start, tracking, frames, masks)
    psnr1, alpha1 = _psnr_and_alpha_error(field, trained, tracking, frames, masks)
    assert psnr1 > psnr0 + 5.0, (psnr0, psnr1)
    assert alpha1 < 0.6 * alpha0, (alpha0, alpha1)
    assert trained.info["psnr"] > 15 and trained.info["occupied_fraction"] < 1.0
