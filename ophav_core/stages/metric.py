"""The metric contract: what a metric plugin declares (:class:`MetricSpec`) and what a protocol hands it
(:class:`MetricInputs`). It sits beside the stages' contracts because the plugin host checks what plugins
register against it; :mod:`ophav_core.study.metrics` runs metrics and collects their values.

A metric plugin::

    from ophav_core import hookimpl
    from ophav_core.stages.metric import MetricSpec

    @hookimpl
    def register_metric(register):
        register(MetricSpec(name="mouth_open", compute="my_pkg.metric:mouth_open", higher_is_better=False,
                            needs=("frames",), definition="...", requires=("cv2",), extra="my-extra"))

``compute`` takes a :class:`MetricInputs` and returns one value per render (an array (N,), NaN where a render
cannot be measured), one value for the whole set (a float: FID), or a dict holding the metric's own column and
its companion columns (:attr:`MetricSpec.companions`); a column it cannot compute may hold the exception that
says why (that column alone reads n/a). It asks for what it needs with ``inputs.get(name)``
(names in :data:`INPUTS`); an input the protocol cannot give raises :class:`MetricInputMissing`, and the
metric reads ``n/a`` with the reason. So does a missing package (the install hint from ``extra``) or weights file
(the weight store's message): never a made-up number.

This module imports nothing heavy; the core defines no network: metrics live in plugins (ours in
``plugins/ophav_metrics``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ophav_core.errors import InvalidData, OphavError, UsageError
from ophav_core.registry import _resolve, missing_modules

#: What a protocol can hand a metric (``MetricInputs.get(name)``).
INPUTS: dict[str, str] = {
    "pred": "the renders, uint8 (N, H, W, 3), composited on black (always given)",
    "alpha": "the renders' alpha, float32 (N, H, W) in [0, 1]",
    "target": "ground truth of the same frames, uint8 (N, H, W, 3), matted on black (self-reenactment only)",
    "region": "bool (N, H, W): where the render or the ground truth shows the head (self-reenactment only)",
    "frames": "the real frames the renders follow, uint8 (N, H, W, 3): the held-out frames (self-reenactment) "
              "or the driver's frames (cross-identity)",
    "real_heads": "real heads matted on black, uint8 (M, H, W, 3), for set metrics such as FID",
    "portrait": "the person's portrait, uint8 (H, W, 3)",
    "neutral": "the avatar's own neutral frontal render, uint8 (1, H, W, 3), composited on black",
    "head_region": "bool (N, H, W): the tracked mesh's hull in each render grown by a hair and neck band",
    "render_tracking": "the Tracking of the renders (their known render parameters)",
    "template": "the avatar's template Tracking",
    "tracker": "the run's Tracker component",
    "reference_tracking": "the Tracking of `frames` by the same tracker, in the avatar's basis",
    "identity_reference": "(images, landmarks5) CSIM compares identity with: the portrait when known, else the "
                          "frames",
    "fps": "frames per second of the renders (float)",
    "device": "the torch device string for networks",
}


class MetricInputMissing(OphavError):
    """A protocol cannot give an input a metric needs; the message says why (the metric reads n/a)."""


@dataclass(frozen=True)
class Column:
    """One reported number. header: the table heading (with its arrow); definition: what exactly it is."""

    name: str
    header: str
    higher_is_better: bool
    decimals: int = 4
    definition: str = ""

    def format(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "n/a"
        return f"{float(value):.{self.decimals}f}"

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header, "higher_is_better": self.higher_is_better, "decimals": self.decimals,
                "definition": self.definition}


@dataclass(frozen=True)
class PackagedModel:
    """A trained model file that ships inside a pip package (not in the weight store), recorded so its licence
    is in the weights docs. package: the pip distribution; path: the file inside it."""

    name: str
    package: str
    path: str
    license: str
    needed_by: str
    restricted: bool = False
    source: str = ""
    description: str = ""


@dataclass
class MetricSpec:
    """One metric a plugin offers.

    name: what ``--metrics`` and grid files call it (and its main column's name).
    compute: ``"module:function"`` (imported only when the metric runs) or a callable ``(MetricInputs) ->``
        array (N,) | float | dict of column name -> array or float.
    higher_is_better: the direction of the main column. header: its table heading (default: name and arrow).
    definition: exactly what is measured (units, reference, what NaN frames mean); written into metrics.json.
    needs: names from :data:`INPUTS` the metric cannot do without (checked before it runs, listed in docs).
    companions: further columns the compute returns beside the main one (e.g. the share of frames without a
        face beside an identity distance).
    requires: importable modules it needs; extra: the pip extra that installs them (for the install hint).
    weights: weight-store names it needs (``register_weights``); a missing file makes it n/a.
    models: :class:`PackagedModel` files it loads from an installed package (their licences go in the docs).
    order: where its columns go in tables (the paper's metrics first).
    """

    name: str
    compute: Any
    higher_is_better: bool
    definition: str
    header: str = ""
    decimals: int = 4
    needs: tuple[str, ...] = ()
    companions: tuple[Column, ...] = ()
    requires: tuple[str, ...] = ()
    extra: str = ""
    weights: tuple[str, ...] = ()
    models: tuple[PackagedModel, ...] = ()
    summary: str = ""
    order: int = 1000
    package: str = "?"
    version: str = "?"
    plugin: str = "?"

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum() or self.name != self.name.lower():
            raise UsageError(f"metric name {self.name!r} must be lower-case letters, digits or '_'")
        self.needs, self.requires, self.weights = tuple(self.needs), tuple(self.requires), tuple(self.weights)
        self.companions, self.models = tuple(self.companions), tuple(self.models)
        unknown = [n for n in self.needs if n not in INPUTS]
        if unknown:
            raise UsageError(f"metric {self.name!r} needs unknown input(s) {', '.join(unknown)}; inputs: "
                             f"{', '.join(INPUTS)}")
        if not self.header:
            self.header = self.name + ("↑" if self.higher_is_better else "↓")
        names = [c.name for c in self.companions]
        if self.name in names or len(set(names)) != len(names):
            raise UsageError(f"metric {self.name!r}: column names must be unique")

    @property
    def column(self) -> Column:
        return Column(self.name, self.header, self.higher_is_better, self.decimals, self.definition)

    def columns(self) -> tuple[Column, ...]:
        return (self.column, *self.companions)

    def compute_function(self) -> Callable[["MetricInputs"], Any]:
        return _resolve(self.compute)

    def missing_requirements(self) -> list[str]:
        return missing_modules(self.requires)

    def install_hint(self) -> str:
        return f"pip install 'ophav[{self.extra}]'" if self.extra else "install it"


_UNSET = object()


class MetricInputs:
    """What a protocol hands its metrics. ``given`` holds values; ``lazy`` callables computed on first use and
    shared by every metric of the evaluation (a neutral render, the tracker's view of the renders);
    ``unavailable`` says why an input cannot be given (shown as the metric's n/a reason). ``cache`` is a dict the
    metrics may share work through (keyed by the metric plugin's own names)."""

    def __init__(self, protocol: str, pred: np.ndarray, *, given: Mapping[str, Any] | None = None,
                 lazy: Mapping[str, Callable[[], Any]] | None = None,
                 unavailable: Mapping[str, str] | None = None) -> None:
        self.protocol = protocol
        self.pred = np.asarray(pred)
        if self.pred.ndim != 4 or self.pred.shape[-1] != 3 or self.pred.dtype != np.uint8:
            raise InvalidData(f"metric inputs: pred must be uint8 (N, H, W, 3), got {self.pred.dtype} "
                              f"{self.pred.shape}")
        self._values: dict[str, Any] = {"pred": self.pred}
        self._values.update({k: v for k, v in (given or {}).items() if v is not None})
        self._lazy = dict(lazy or {})
        self._unavailable = dict(unavailable or {})
        self.cache: dict[str, Any] = {}
        for name in (*self._values, *self._lazy):
            if name not in INPUTS:
                raise InvalidData(f"metric inputs: unknown input {name!r}")

    def __len__(self) -> int:
        return len(self.pred)

    def has(self, name: str) -> bool:
        return name in self._values or name in self._lazy

    def why_missing(self, name: str) -> str:
        return self._unavailable.get(name) or f"the {self.protocol} protocol gives no {name} ({INPUTS.get(name, '?')})"

    def get(self, name: str, default: Any = _UNSET) -> Any:
        if name in self._values:
            return self._values[name]
        if name in self._lazy:
            self._values[name] = self._lazy.pop(name)()
            return self._values[name]
        if default is not _UNSET:
            return default
        raise MetricInputMissing(self.why_missing(name))
