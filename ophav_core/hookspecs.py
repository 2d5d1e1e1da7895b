"""The hooks a plugin implements. Each ``register_*`` hook receives a ``register`` callback; call it once per
component with a :class:`~ophav_core.registry.ComponentSpec`. Hook calls are keyword-only and untyped in pluggy,
so ophav never calls ``pm.hook`` directly outside :mod:`ophav_core.plugins`.

A plugin module::

    from ophav_core import hookimpl
    from ophav_core.registry import ComponentSpec

    @hookimpl
    def register_restorer(register):
        register(ComponentSpec(stage="restorer", name="mine", factory="my_pkg.restorer:MyRestorer",
                               options="my_pkg.options:MyOptions"))
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ophav")
hookimpl = pluggy.HookimplMarker("ophav")


@hookspec
def register_image2video(register) -> None:
    """Register Image2Video components."""


@hookspec
def register_segmenter(register) -> None:
    """Register Segmenter components."""


@hookspec
def register_tracker(register) -> None:
    """Register Tracker components."""


@hookspec
def register_avatar_field(register) -> None:
    """Register AvatarField components."""


@hookspec
def register_restorer(register) -> None:
    """Register Restorer components."""


@hookspec
def register_weights(register) -> None:
    """Register weights files (:class:`~ophav_core.weights.WeightFile`) that components need."""


@hookspec
def register_metric(register) -> None:
    """Register metrics (:class:`~ophav_core.stages.metric.MetricSpec`) that ``ophav eval`` and ``ophav ablate``
    report."""
