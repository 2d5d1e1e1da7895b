"""The embedded ``reference`` restorer: portrait detail carried into renders through the tracked mesh."""
from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

import ophav_core.stages  # noqa: E402,F401  (import the stages before ophav_core.testing.synthetic)
from ophav_core.stages.motion import euler_to_matrix  # noqa: E402
from ophav_core.stages import Portrait, RestoreInput  # noqa: E402
from ophav_core.testing import contracts  # noqa: E402
from ophav_core.testing.synthetic import synthetic_tracking  # noqa: E402
from ophav_reference.metrics import laplacian_variance  # noqa: E402
from ophav_core.media.raster import rasterise  # noqa: E402
from ophav_reference.restorer import ReferenceRestorer  # noqa: E402

SIZE = 128


def _restorer(**options) -> ReferenceRestorer:
    return ReferenceRestorer(ReferenceRestorer.Options(**options), contracts.tiny_context())


def _textured(seed: int = 0, amplitude: float = 30.0, blobs: bool = True) -> np.ndarray:
    """A smooth colour gradient with blobs a few pixels wide (structure a blurred render keeps) and fine random
    texture (the detail a blurred render lacks)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    base = np.stack([100 + 60 * xx, 120 + 40 * yy, 140 - 30 * xx], -1)
    mid = cv2.GaussianBlur(rng.normal(0, 8 * amplitude, (SIZE, SIZE)).astype(np.float32), (0, 0), 3.0)
    texture = cv2.GaussianBlur(rng.normal(0, amplitude, (SIZE, SIZE, 3)).astype(np.float32), (0, 0), 0.7)
    return np.clip(base + mid[..., None] * blobs + texture, 0, 255).astype(np.uint8)


def _frontal_mesh():
    tracking = synthetic_tracking(1, SIZE, max_yaw=0.0)
    return tracking, tracking.project(tracking.vertices)[0], tracking.vertices[0, :, 2]


def _batch(render: np.ndarray, portrait: np.ndarray, v2d, depth, portrait_v2d, portrait_depth, tracking) -> RestoreInput:
    return RestoreInput(images=render[None], alpha=np.ones((1, SIZE, SIZE), np.float32),
                        landmarks5=np.zeros((1, 5, 2), np.float32), vertices2d=v2d[None], vertex_depth=depth[None],
                        portrait=Portrait(portrait, "test"), portrait_vertices2d=portrait_v2d,
                        portrait_vertex_depth=portrait_depth, faces=tracking.faces)


def _mesh_mask(v2d: np.ndarray, faces: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
    """Pixels of the given triangles, drawn with OpenCV (independent of the restorer's own rasteriser)."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for f in np.flatnonzero(np.ones(len(faces), bool) if select is None else select):
        cv2.fillConvexPoly(mask, np.rint(v2d[faces[f]] * 16).astype(np.int32), 1, shift=4)
    return mask.astype(bool)


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = ((a[mask].astype(np.float64) - b[mask]) ** 2).mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def test_contract():
    out = contracts.check_restorer(_restorer())
    assert out.std() > 0


def test_registered_as_reference_restorer():
    import ophav_reference.plugin as plugin
    from ophav_core.plugins import build_host

    host = build_host(extra_plugins=[("reference-under-test", plugin)], load_entry_points=False)
    spec = host.registry.get("restorer", "reference")
    assert spec.weights == () and spec.missing_requirements() == []
    component = spec.create({"strength": 0.5}, contracts.tiny_context())
    assert isinstance(component, ReferenceRestorer) and component.options.strength == 0.5


def test_options_forbid_unknown_and_validate_ranges():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ReferenceRestorer.Options(strength=-1)
    with pytest.raises(ValidationError):
        ReferenceRestorer.Options(levels=0)


def test_rasteriser_matches_projection():
    tracking, v2d, depth = _frontal_mesh()
    raster = rasterise(v2d, depth, tracking.faces, (SIZE, SIZE))
    # Interpolating the vertices' own pixel positions gives back each pixel's centre.
    positions = raster.interpolate(v2d.astype(np.float64))
    assert np.abs(positions - np.stack([raster.xs, raster.ys], -1)).max() < 1e-3
    # Same coverage as OpenCV's filling of the front-facing triangles, up to edge pixels.
    reference = _mesh_mask(v2d, tracking.faces)
    assert abs(int(raster.mask.sum()) - int(reference.sum())) < 0.05 * reference.sum()


def test_blurred_render_gets_closer_to_sharp_portrait_and_outside_is_unchanged():
    tracking, v2d, depth = _frontal_mesh()
    portrait = _textured()
    render = cv2.GaussianBlur(portrait, (0, 0), 1.5)
    result = _restorer().restore_detailed(_batch(render, portrait, v2d, depth, v2d, depth, tracking))[0]
    restored = result.image
    face = result.weight > 0.99
    assert face.sum() > 0.5 * _mesh_mask(v2d, tracking.faces).sum()
    before, after = _psnr(render, portrait, face), _psnr(restored, portrait, face)
    assert after > before + 6.0, f"PSNR {before:.1f} -> {after:.1f} dB"
    assert laplacian_variance(restored, face) > 5 * laplacian_variance(render, face)
    # Nothing outside the mesh moves, not even by rounding.
    outside = ~cv2.dilate(_mesh_mask(v2d, tracking.faces).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert np.array_equal(restored[outside], render[outside])
    # strength scales the transfer; 0 leaves the render alone.
    assert np.array_equal(_restorer(strength=0).restore(_batch(render, portrait, v2d, depth, v2d, depth, tracking))[0],
                          render)


def test_region_hidden_in_portrait_is_left_alone():
    tracking = synthetic_tracking(1, SIZE, max_yaw=0.0)
    translation = tracking.translation[:1]
    zero_expr = np.zeros((1, tracking.num_expressions), np.float32)

    def view(yaw: float):
        cam = tracking.mesh_for(euler_to_matrix([yaw], [0.0], [0.0]), translation, zero_expr)[0]
        return cam, tracking.project(cam)

    portrait_cam, portrait_v2d = view(40.0)
    render_cam, render_v2d = view(-15.0)
    portrait = _textured(seed=1, amplitude=40.0, blobs=False)
    render = np.full((SIZE, SIZE, 3), 128, np.uint8)  # flat: agrees with the portrait's low frequencies
    batch = _batch(render, portrait, render_v2d, render_cam[:, 2], portrait_v2d, portrait_cam[:, 2], tracking)
    restored = _restorer(refine=False).restore(batch)[0]

    tri = portrait_cam[tracking.faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    centre = tri.mean(axis=1)
    cos_portrait = -(normal * centre).sum(1) / (np.linalg.norm(normal, axis=1) * np.linalg.norm(centre, axis=1))
    tri_r = render_cam[tracking.faces]
    normal_r = np.cross(tri_r[:, 1] - tri_r[:, 0], tri_r[:, 2] - tri_r[:, 0])
    front_in_render = (normal_r * tri_r.mean(axis=1)).sum(1) < 0
    erode = lambda m: cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # noqa: E731
    hidden = erode(_mesh_mask(render_v2d, tracking.faces, front_in_render & (cos_portrait < 0)))
    seen = erode(_mesh_mask(render_v2d, tracking.faces, front_in_render & (cos_portrait > 0.8)))
    assert hidden.sum() > 100 and seen.sum() > 100, "the test views should show both regions"
    change = np.abs(restored.astype(int) - render).max(axis=2)
    assert change[hidden].max() == 0, "detail was pasted where the portrait does not see the surface"
    assert change[seen].mean() > 3, "no detail arrived where the portrait sees the surface"


def test_inconsistent_region_gets_no_detail():
    """An open mouth (dark, flat) in the render where the portrait shows bright textured lips stays a dark mouth."""
    tracking, v2d, depth = _frontal_mesh()
    c = SIZE // 2
    mouth = np.s_[c + 4:c + 26, c - 20:c + 20]
    core = np.s_[c + 10:c + 20, c - 14:c + 14]
    face = _textured(seed=2)
    portrait = face.copy()
    portrait[mouth] = np.clip(portrait[mouth].astype(int) + 60, 0, 255).astype(np.uint8)
    opened = face.copy()
    opened[mouth] = 60
    render = cv2.GaussianBlur(opened, (0, 0), 1.5)
    batch = _batch(render, portrait, v2d, depth, v2d, depth, tracking)
    cheek = np.s_[c - 20:c - 5, c - 20:c - 5]
    # The colour consistency check alone (the structure alignment check off) keeps the mouth, and so do both.
    for restorer in (_restorer(alignment_check=False), _restorer()):
        restored = restorer.restore(batch)[0]
        assert np.abs(restored[core].astype(int) - render[core]).max() <= 3, "lips were pasted into the open mouth"
        assert np.abs(restored[cheek].astype(int) - render[cheek]).mean() > 3, "the consistent face got no detail"


def test_large_portrait_and_threads_give_the_same_answer():
    """A portrait twice the render's size is sampled from its half-resolution level; threads change nothing."""
    tracking, v2d, depth = _frontal_mesh()
    portrait = _textured(seed=3)
    big = cv2.resize(portrait, (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_CUBIC)
    render = cv2.GaussianBlur(portrait, (0, 0), 1.5)
    batch = RestoreInput(images=np.stack([render, render[:, ::-1].copy()]), alpha=np.ones((2, SIZE, SIZE), np.float32),
                         landmarks5=np.zeros((2, 5, 2), np.float32), vertices2d=np.stack([v2d, v2d]),
                         vertex_depth=np.stack([depth, depth]), portrait=Portrait(big, "big"),
                         portrait_vertices2d=2 * v2d + 0.5, portrait_vertex_depth=depth, faces=tracking.faces)
    single = _restorer(workers=1).restore(batch)
    threaded = _restorer(workers=2).restore(batch)
    assert np.array_equal(single, threaded)
    face = _restorer(workers=1).restore_detailed(batch)[0].weight > 0.99
    assert _psnr(single[0], portrait, face) > _psnr(render, portrait, face) + 3.0


def test_flow_refinement_corrects_a_small_tracking_error():
    """The render's mesh is off by two pixels; the optical-flow refinement puts the detail back in place."""
    tracking, v2d, depth = _frontal_mesh()
    portrait = _textured(seed=4)
    render = cv2.GaussianBlur(portrait, (0, 0), 1.5)
    batch = _batch(render, portrait, v2d + np.float32([2.0, -1.5]), depth, v2d, depth, tracking)
    face = _restorer().restore_detailed(_batch(render, portrait, v2d, depth, v2d, depth, tracking))[0].weight > 0.99
    refined = _restorer().restore(batch)[0]
    unrefined = _restorer(refine=False, alignment_check=False).restore(batch)[0]
    assert _psnr(refined, portrait, face) > _psnr(unrefined, portrait, face) + 3.0
    assert _psnr(refined, portrait, face) > _psnr(render, portrait, face) + 3.0


def test_shape_distance_ignores_pose_and_scale():
    from ophav_reference.metrics import high_frequency_energy, shape_distance

    tracking, _, _ = _frontal_mesh()
    shape = tracking.canonical_vertices.astype(np.float64)
    moved = 1.3 * shape @ euler_to_matrix([20.0], [-10.0], [5.0])[0].T + np.array([3.0, -2.0, 40.0])
    assert shape_distance(moved, shape) < 1e-5
    bumped = shape + np.random.default_rng(0).normal(0, 0.2, shape.shape)
    assert shape_distance(bumped, shape) > 0.005
    sharp = _textured()
    assert high_frequency_energy(sharp) > 4 * high_frequency_energy(cv2.GaussianBlur(sharp, (0, 0), 2.0))
