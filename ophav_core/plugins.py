"""Build the plugin manager and the component registry, on demand (never at import).

Every plugin, ours included, is a module named by an entry point in the ``ophav`` group. Each one loads inside
its own try/except: a broken plugin is recorded (``ophav plugins`` shows it) and every other command still works.

Environment:
    OPHAV_DISABLE_PLUGINS=a,b   skip these plugins (entry-point names or distribution names)
    OPHAV_STRICT_PLUGINS=1      re-raise the first plugin failure instead of recording it
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from typing import Any, Iterable

import pluggy

from ophav_core import hookspecs
from ophav_core.registry import ComponentSpec, Registry
from ophav_core.errors import OphavError

ENTRY_POINT_GROUP = "ophav"
_HOOK_STAGE = {
    "register_image2video": "image2video",
    "register_segmenter": "segmenter",
    "register_tracker": "tracker",
    "register_avatar_field": "field",
    "register_restorer": "restorer",
}


@dataclass
class PluginInfo:
    name: str
    package: str
    version: str
    module: str
    error: str | None = None


@dataclass
class PluginHost:
    """The loaded plugins, the components they register, the weights files they declare and the metrics they
    offer (name -> :class:`~ophav_core.stages.metric.MetricSpec`)."""

    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo] = field(default_factory=list)
    weights: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]


def _env_list(name: str) -> set[str]:
    return {item.strip() for item in os.environ.get(name, "").split(",") if item.strip()}


def _strict() -> bool:
    return os.environ.get("OPHAV_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def _failure(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def build_host(extra_plugins: Iterable[tuple[str, Any]] = (), load_entry_points: bool = True) -> PluginHost:
    """Load every plugin and collect its components.

    extra_plugins: ``(name, module_or_object)`` pairs registered after the entry points (tests, embedding apps).
    """
    pm = pluggy.PluginManager("ophav")
    pm.add_hookspecs(hookspecs)
    disabled = _env_list("OPHAV_DISABLE_PLUGINS")
    infos: list[PluginInfo] = []
    sources: list[tuple[Any, PluginInfo]] = []

    if load_entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            package = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            if ep.name in disabled or package in disabled:
                continue
            info = PluginInfo(ep.name, package, version, ep.value)
            infos.append(info)
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
                sources.append((module, info))
            except Exception as exc:  # one broken plugin must not break the others
                if _strict():
                    raise
                info.error = _failure(exc)
    for name, obj in extra_plugins:
        if name in disabled:
            continue
        info = PluginInfo(name, getattr(obj, "__ophav_package__", name), getattr(obj, "__version__", "0"),
                          getattr(obj, "__name__", repr(obj)))
        infos.append(info)
        pm.register(obj, name=name)
        sources.append((obj, info))

    host = PluginHost(pm, Registry(), infos)
    by_plugin = {id(obj): info for obj, info in sources}
    for hook_name, stage in _HOOK_STAGE.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = by_plugin.get(id(impl.plugin))
            if info is None or info.error:
                continue
            _call_register(impl, info, partial(_register_component, host.registry, stage, info))
    for impl in pm.hook.register_weights.get_hookimpls():
        info = by_plugin.get(id(impl.plugin))
        if info is not None and not info.error:
            _call_register(impl, info, partial(_register_weight, host.weights, info))
    for impl in pm.hook.register_metric.get_hookimpls():
        info = by_plugin.get(id(impl.plugin))
        if info is not None and not info.error:
            _call_register(impl, info, partial(_register_metric, host.metrics, info))
    return host


def _call_register(impl, info: PluginInfo, register) -> None:
    try:
        impl.function(register=register)
    except OphavError:
        raise
    except Exception as exc:
        if _strict():
            raise
        info.error = _failure(exc)


def _register_component(registry: Registry, stage: str, info: PluginInfo, spec: ComponentSpec) -> None:
    if not isinstance(spec, ComponentSpec):
        raise TypeError(f"plugin {info.name}: register() takes a ComponentSpec, got {type(spec).__name__}")
    if spec.stage != stage:
        raise TypeError(f"plugin {info.name}: {spec.name!r} is a {spec.stage} but was registered by the {stage} hook")
    spec.package, spec.version, spec.plugin = info.package, info.version, info.name
    registry.add(spec)


def _register_weight(weights: dict[str, Any], info: PluginInfo, weight) -> None:
    from ophav_core.weights import WeightFile

    if not isinstance(weight, WeightFile):
        raise TypeError(f"plugin {info.name}: register() takes a WeightFile, got {type(weight).__name__}")
    if weight.name in weights and weights[weight.name] != weight:
        raise OphavError(f"plugins {weights[weight.name].plugin} and {info.name} both declare weights {weight.name!r}")
    weights[weight.name] = weight


def _register_metric(metrics: dict[str, Any], info: PluginInfo, spec) -> None:
    from ophav_core.stages.metric import MetricSpec

    if not isinstance(spec, MetricSpec):
        raise TypeError(f"plugin {info.name}: register() takes a MetricSpec, got {type(spec).__name__}")
    spec.package, spec.version, spec.plugin = info.package, info.version, info.name
    old = metrics.get(spec.name)
    if old is not None and not (old.package == spec.package and old.compute == spec.compute):
        raise OphavError(f"two packages register the metric {spec.name!r}: {old.package} {old.version} (plugin "
                         f"{old.plugin}) and {spec.package} {spec.version} (plugin {spec.plugin}); uninstall one, "
                         f"or block one with OPHAV_DISABLE_PLUGINS={spec.plugin}")
    metrics[spec.name] = spec


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The plugin host of this process, built on first use (never at import). ``OPHAV_TEST_FAKES=1`` adds the fake
    components of :mod:`ophav_core.testing.fakes`; a plugin that failed to load is named once on stderr."""
    global _HOST
    if _HOST is None:
        extra = []
        if os.environ.get("OPHAV_TEST_FAKES"):
            from ophav_core.testing.fakes import FakePlugin

            extra.append(("fakes", FakePlugin()))
        _HOST = build_host(extra_plugins=extra)
        if _HOST.failures:
            names = ", ".join(f.name for f in _HOST.failures)
            print(f"warning: plugin(s) {names} failed to load; `ophav plugins` says why", file=sys.stderr)
    return _HOST


def reset_host() -> None:
    """Forget the host, so the next :func:`get_host` loads the plugins again (tests, and after installing one)."""
    global _HOST
    _HOST = None
