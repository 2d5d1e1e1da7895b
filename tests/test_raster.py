"""The core's triangle rasteriser (ophav_core/media/raster.py), shared by meshwarp and the reference restorer."""
from __future__ import annotations

import numpy as np

from ophav_core.media.raster import facing_camera, front_facing, rasterise


def test_rasteriser_z_order_and_clamped_interpolation():
    points = np.array([[2, 2], [30, 2], [2, 30], [5, 5], [40, 5], [5, 40]], np.float64)
    depth = np.array([10, 10, 10, 5, 5, 5], np.float64)  # the second triangle is nearer
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    raster = rasterise(points, depth, faces, (48, 48), cull=False)
    ids = raster.ids
    assert ids[10, 10] == 1 and ids[3, 3] == 0 and ids[45, 45] == -1
    values = np.stack([points[:, 0] * 2 + 1, points[:, 1] - 3], axis=1)  # an affine function is reproduced exactly
    rows, cols, out = raster.ys, raster.xs, raster.interpolate(values)
    inside = (cols > 6) & (rows > 6) & (cols + rows < 38)
    assert np.allclose(out[inside, 0], cols[inside] * 2 + 1, atol=1e-3)
    assert np.allclose(out[inside, 1], rows[inside] - 3, atol=1e-3)
    # A sliver thinner than a pixel never extrapolates beyond its corners' values.
    sliver = np.array([[0, 10.0], [47, 10.2], [20, 10.1]])
    raster = rasterise(sliver, np.ones(3), np.array([[0, 1, 2]]), (48, 48), cull=False)
    out = raster.interpolate(np.array([[0.0], [1.0], [2.0]]))
    assert out.min() >= 0.0 and out.max() <= 2.0


def test_coverage_is_exact_and_edges_are_shared_once():
    # Two triangles sharing the diagonal of a square: every pixel centre of the square is covered by exactly
    # one of them, none outside it.
    points = np.array([[3.5, 3.5], [20.5, 3.5], [20.5, 20.5], [3.5, 20.5]])
    faces = np.array([[0, 2, 1], [0, 3, 2]])  # both facing the camera (negative area, y down)
    assert front_facing(points, faces).all()
    raster = rasterise(points, np.ones(4), faces, (32, 32))
    expected = np.zeros((32, 32), bool)
    expected[4:21, 4:21] = True
    assert np.array_equal(raster.mask, expected)
    assert len(raster.ys) == expected.sum()  # one winner per pixel
    # Culling: the same square wound the other way is back-facing and not drawn.
    assert not rasterise(points, np.ones(4), faces[:, ::-1], (32, 32)).mask.any()


def test_interpolate_at_and_select_agree_with_interpolate():
    points = np.array([[1.0, 1.0], [30.0, 2.0], [4.0, 28.0]])
    faces = np.array([[0, 2, 1]])
    raster = rasterise(points, np.array([1.0, 2.0, 3.0]), faces, (32, 32))
    values = np.array([[0.0, 1.0], [2.0, 5.0], [4.0, -1.0]])
    full = raster.interpolate(values)
    pick = np.arange(0, len(raster.ys), 7)
    assert np.allclose(raster.interpolate(values, pick), full[pick])
    assert np.allclose(raster.interpolate_at(values, raster.ys[pick], raster.xs[pick]), full[pick])
    assert raster.dense(full[:, 0], fill=-1.0)[raster.ys[0], raster.xs[0]] == full[0, 0]


def test_culling_in_the_image_is_facing_in_3d():
    # A pinhole camera: a triangle's projected winding flips exactly when its outward normal turns away.
    rng = np.random.default_rng(0)
    K = np.array([[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]])
    vertices = rng.uniform([-1, -1, 3], [1, 1, 5], (60, 3))
    faces = rng.integers(0, 60, (200, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    uvw = vertices @ K.T
    points = uvw[:, :2] / uvw[:, 2:]
    cosine = facing_camera(vertices, faces)
    clear = np.abs(cosine) > 1e-3
    assert np.array_equal(front_facing(points, faces)[clear], cosine[clear] > 0)
