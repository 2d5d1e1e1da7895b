"""Where a component finds the components of other stages outside a run: the registry's defaults.

A run hands its own configured components to every :class:`~ophav_core.stages.base.RunContext` (the scheduler);
everything else that builds a context (``ophav_core.api``, the test contexts) hands in a
:class:`RegistryComponents`, so an image2video that tracks the portrait gets the default tracker with its
default options, exactly as a run without ``--tracker`` would.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ophav_core.stages.base import Component, RunContext


class RegistryComponents:
    """A component source (``(stage, asking context) -> component``) that creates each stage's chosen component
    once, on first use: ``choices`` maps stage -> component name (the default component where not given), with
    default options. Created components get the asking context's settings, their own scratch folder beside it,
    and this same source."""

    def __init__(self, choices: dict[str, str] | None = None, registry: Any = None):
        self.choices = dict(choices or {})
        self.registry = registry
        self._made: dict[str, Component] = {}

    def __call__(self, stage: str, asking: RunContext) -> Component:
        if stage not in self._made:
            from ophav_core.config import DEFAULT_COMPONENTS, StageChoice, resolve_stage
            from ophav_core.plugins import get_host

            registry = self.registry if self.registry is not None else get_host().registry
            name = self.choices.get(stage, DEFAULT_COMPONENTS[stage])
            resolved = resolve_stage(registry, stage, StageChoice(name=name))
            work = asking.work_dir / f"{stage}-{name}"
            work.mkdir(parents=True, exist_ok=True)
            context = dataclasses.replace(asking, work_dir=work, components=self)
            self._made[stage] = resolved.spec.create(resolved.options, context)
        return self._made[stage]


def registry_components(choices: dict[str, str] | None = None, registry: Any = None) -> RegistryComponents:
    """A fresh :class:`RegistryComponents` (see there)."""
    return RegistryComponents(choices, registry)
