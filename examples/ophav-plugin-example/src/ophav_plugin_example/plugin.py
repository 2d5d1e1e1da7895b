"""Hook implementations only. ophav imports this module through the ``ophav`` entry point; it must stay light
(no numpy/scipy work, no model loading): the registry is built on every command."""
from ophav_core import hookimpl
from ophav_core.registry import ComponentSpec
from ophav_core.stages.metric import MetricSpec


@hookimpl
def register_restorer(register):
    register(ComponentSpec(
        stage="restorer", name="unsharp",
        factory="ophav_plugin_example.restorer:UnsharpRestorer",  # imported only when a run uses it
        options="ophav_plugin_example.restorer:UnsharpOptions",   # imported to validate a config
        summary="unsharp mask inside the head alpha (example third-party plugin, no weights)",
        requires=("scipy",)))


@hookimpl
def register_metric(register):
    register(MetricSpec(
        name="head_gradient", header="grad↑", higher_is_better=True, decimals=2,
        compute="ophav_plugin_example.metric:head_gradient",  # imported only when the metric runs
        needs=("alpha",),  # without the renders' alpha the metric is n/a, never a number
        summary="mean image gradient inside the rendered head (example third-party metric)",
        definition="mean |dI/dx| + |dI/dy| of the grey render (0..255) over pixels with alpha > 0.5"))
