"""Components by (stage, name), with the package and version each came from."""
from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from ophav_core.errors import ComponentNotFound, DuplicateComponent, UsageError

STAGE_KEYS = ("image2video", "segmenter", "tracker", "field", "restorer")


def _resolve(ref: Any) -> Any:
    """``"pkg.module:attr"`` -> the object; anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def missing_modules(modules) -> list[str]:
    """The import names among ``modules`` that cannot be found (checked without importing them)."""
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing


@dataclass
class ComponentSpec:
    """One component a plugin offers.

    factory: the component class, or ``"module:Class"`` so heavy modules are imported only when it is used.
    options: the pydantic options model (``extra="forbid"``), or ``"module:Model"``; ``None`` = no options.
        Keep the options model in a light module: it is imported to validate a config before any work starts.
    requires: importable module names the component needs (``ophav plugins`` reports missing ones).
    weights: names of weights files in the weight store that it needs.
    extra: the pip extra that installs its requirements, for install hints.
    """

    stage: str
    name: str
    factory: Any
    options: Any = None
    summary: str = ""
    requires: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    extra: str = ""
    package: str = "?"
    version: str = "?"
    plugin: str = "?"

    def __post_init__(self) -> None:
        if self.stage not in STAGE_KEYS:
            raise UsageError(f"component {self.name!r}: unknown stage {self.stage!r}; stages: {', '.join(STAGE_KEYS)}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"component name {self.name!r} must be letters, digits, '-' or '_'")
        self.requires, self.weights = tuple(self.requires), tuple(self.weights)

    def options_model(self) -> type[BaseModel]:
        from ophav_core.stages.base import NoOptions

        return _resolve(self.options) if self.options is not None else NoOptions

    def component_class(self):
        return _resolve(self.factory)

    def missing_requirements(self) -> list[str]:
        return missing_modules(self.requires)

    def create(self, options: BaseModel | dict | None, context):
        missing = self.missing_requirements()
        if missing:
            hint = f" (pip install 'ophav[{self.extra}]')" if self.extra else ""
            raise UsageError(f"{self.stage} {self.name!r} needs {', '.join(missing)}, which is not installed{hint}")
        cls = self.component_class()
        if isinstance(options, dict) or options is None:
            options = self.options_model()(**(options or {}))
        return cls(options, context)


@dataclass
class Registry:
    components: dict[tuple[str, str], ComponentSpec] = field(default_factory=dict)

    def add(self, spec: ComponentSpec) -> None:
        key = (spec.stage, spec.name)
        old = self.components.get(key)
        if old is not None:
            if old.package == spec.package and old.factory == spec.factory:
                return
            raise DuplicateComponent(
                f"two packages register the {spec.stage} {spec.name!r}: {old.package} {old.version} "
                f"(plugin {old.plugin}) and {spec.package} {spec.version} (plugin {spec.plugin}); "
                f"uninstall one, or block one with OPHAV_DISABLE_PLUGINS={spec.plugin}")
        self.components[key] = spec

    def names(self, stage: str) -> list[str]:
        return sorted(name for (s, name) in self.components if s == stage)

    def by_stage(self, stage: str) -> list[ComponentSpec]:
        return [self.components[(stage, n)] for n in self.names(stage)]

    def get(self, stage: str, name: str) -> ComponentSpec:
        if stage not in STAGE_KEYS:
            raise UsageError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_KEYS)}")
        try:
            return self.components[(stage, name)]
        except KeyError:
            pass
        names = self.names(stage)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        available = ", ".join(names) if names else "none (is the plugin installed?)"
        raise ComponentNotFound(f"no {stage} named {name!r}.{hint} Installed: {available}")

    def __iter__(self):
        return iter(sorted(self.components.values(), key=lambda s: (STAGE_KEYS.index(s.stage), s.name)))
