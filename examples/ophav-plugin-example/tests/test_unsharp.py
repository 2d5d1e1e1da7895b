"""Tests of the example plugin, using the core's contract checks and the ``ophav_context`` fixture (from the
pytest plugin that ships with ophav)."""
from importlib import metadata

import numpy as np
import pytest
from pydantic import ValidationError

from ophav_core.testing import contracts
from ophav_core.testing.synthetic import synthetic_restore_input
from ophav_plugin_example.restorer import UnsharpOptions, UnsharpRestorer


def test_contract(ophav_context):
    contracts.check_restorer(UnsharpRestorer(UnsharpOptions(), ophav_context))


def test_sharpens_inside_the_head_and_leaves_the_background(ophav_context):
    batch = synthetic_restore_input(2, 64)
    batch.alpha[:, :, :32] = 0.0  # the left half is "background"
    options = UnsharpOptions(amount=2.0, radius=12.0)  # 1.5 pixels at this 64x64 size
    out = UnsharpRestorer(options, ophav_context).restore(batch)
    left, right = np.s_[:, :, :32], np.s_[:, :, 32:]
    assert np.array_equal(out[left], batch.images[left])

    def edge_energy(images: np.ndarray) -> float:  # mean absolute gradient within the images
        x = images[right].astype(np.float32)
        return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())

    assert edge_energy(out) > 1.2 * edge_energy(batch.images)


def test_amount_zero_is_identity(ophav_context):
    batch = synthetic_restore_input(2, 64)
    out = UnsharpRestorer(UnsharpOptions(amount=0.0), ophav_context).restore(batch)
    assert np.array_equal(out, batch.images)


def test_options_are_validated():
    with pytest.raises(ValidationError):
        UnsharpOptions(amount=-1)
    with pytest.raises(ValidationError):
        UnsharpOptions(sharpness=1)  # unknown options are errors, not silently ignored


def test_registers_through_the_hook():
    from ophav_core.plugins import build_host
    from ophav_plugin_example import plugin

    host = build_host(extra_plugins=[("unsharp", plugin)], load_entry_points=False)
    spec = host.registry.get("restorer", "unsharp")
    assert spec.component_class() is UnsharpRestorer and spec.options_model() is UnsharpOptions


def test_installed_entry_point_is_found():
    names = {ep.value for ep in metadata.entry_points(group="ophav")}
    if "ophav_plugin_example.plugin" not in names:
        pytest.skip("the package is not installed (pip install -e .)")
    from ophav_core.plugins import build_host

    host = build_host()
    assert host.registry.get("restorer", "unsharp").package == "ophav-plugin-example"


def test_metric_contract_and_value():
    from ophav_core.stages.metric import MetricInputs
    from ophav_plugin_example import plugin
    from ophav_plugin_example.metric import head_gradient

    specs = []
    plugin.register_metric(specs.append)
    values = contracts.check_metric(specs[0])
    assert np.isfinite(values["head_gradient"]).all() and (values["head_gradient"] > 0).all()
    stripes = np.zeros((1, 8, 8, 3), np.uint8)
    stripes[:, :, ::2] = 100  # |dI/dx| = 100 everywhere, dI/dy = 0
    alpha = np.ones((1, 8, 8), np.float32)
    assert head_gradient(MetricInputs("images", stripes, given={"alpha": alpha}))[0] == 100.0
