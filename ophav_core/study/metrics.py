"""Running metrics: the collection that computes each registered metric on a protocol's inputs and keeps why one
could not be computed (n/a with the reason, never a made-up number), and the choice of metrics by name. The
contract a metric plugin implements (:class:`MetricSpec`, :class:`MetricInputs`) is in
:mod:`ophav_core.stages.metric`; its names are re-exported here for the code written against this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ophav_core.errors import InvalidData, NoFaceFound, UsageError, WeightsMissing
from ophav_core.stages.metric import (INPUTS, Column, MetricInputMissing, MetricInputs, MetricSpec,  # noqa: F401
                                      PackagedModel)

@dataclass
class Collected:
    """Mean per column (None when not computed), why a column is missing, and the per-frame values."""

    metrics: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    per_frame: dict[str, list[float | None]] = field(default_factory=dict)
    columns: dict[str, Column] = field(default_factory=dict)

    def skip(self, spec: MetricSpec, reason: str) -> None:
        for column in spec.columns():
            self.columns[column.name] = column
            self.metrics[column.name], self.missing[column.name] = None, reason

    def add(self, column: Column, value: Any) -> None:
        self.columns[column.name] = column
        values = np.atleast_1d(np.asarray(value, np.float64))
        finite = values[np.isfinite(values)]
        if np.ndim(value) > 0:
            self.per_frame[column.name] = [round(float(v), 6) if np.isfinite(v) else None for v in values]
        if finite.size == 0:
            self.metrics[column.name] = None
            self.missing[column.name] = "no frame could be measured (no face found, or an empty region)"
            return
        self.metrics[column.name] = float(finite.mean())


def _strict() -> bool:
    return os.environ.get("OPHAV_STRICT_PLUGINS", "").lower() in {"1", "true", "yes"}


def compute_metric(spec: MetricSpec, inputs: MetricInputs) -> tuple[dict[str, Any] | None, str | None]:
    """Run one metric: (its columns' raw values, None) or (None, why it is n/a)."""
    missing = spec.missing_requirements()
    if missing:
        return None, f"needs {', '.join(missing)}, which is not installed ({spec.install_hint()})"
    for name in spec.needs:
        if not inputs.has(name):
            return None, inputs.why_missing(name)
    try:
        value = spec.compute_function()(inputs)
    except (WeightsMissing, MetricInputMissing) as exc:
        return None, str(exc)
    except ImportError as exc:
        text = str(exc)
        if isinstance(exc, ModuleNotFoundError) or not text:
            text = f"{exc.name or exc} is not installed"
        return None, text if "pip install" in text else f"{text} ({spec.install_hint()})"
    except (InvalidData, NoFaceFound, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a broken third-party metric must not take the others down
        if _strict():
            raise
        return None, f"metric {spec.name!r} (plugin {spec.plugin}) failed: {type(exc).__name__}: {exc}"
    values = dict(value) if isinstance(value, Mapping) else {spec.name: value}
    expected = {c.name for c in spec.columns()}
    if set(values) - expected or not values:
        return None, (f"metric {spec.name!r} (plugin {spec.plugin}) returned columns {sorted(values)}, "
                      f"declared {sorted(expected)}")
    for name, v in values.items():
        if isinstance(v, Exception):  # this column alone could not be computed; the exception says why
            continue
        arr = np.asarray(v, np.float64)
        if arr.ndim > 1 or (arr.ndim == 1 and len(arr) != len(inputs)):
            return None, (f"metric {spec.name!r} (plugin {spec.plugin}) gave {name} of shape {arr.shape} for "
                          f"{len(inputs)} renders (one value per render, or one for the set)")
    return values, None


def collect(specs: Iterable[MetricSpec], inputs: MetricInputs) -> Collected:
    """Run each metric on the inputs; a metric that cannot run is n/a with its reason, never a number."""
    out = Collected()
    for spec in specs:
        values, reason = compute_metric(spec, inputs)
        if values is None:
            out.skip(spec, reason or "not computed")
            continue
        for column in spec.columns():
            value = values.get(column.name)
            if isinstance(value, Exception):
                out.columns[column.name] = column
                out.metrics[column.name], out.missing[column.name] = None, str(value)
            elif column.name in values:
                out.add(column, value)
            else:
                out.columns[column.name] = column
                out.metrics[column.name], out.missing[column.name] = None, "not computed for this protocol"
    return out


def resolve_metrics(names: str | Sequence[str] | None, available: Mapping[str, MetricSpec]) -> list[MetricSpec]:
    """The specs named (comma-separated text or a list), in table order; None = every registered metric."""
    ordered = sorted(available.values(), key=lambda s: (s.order, s.name))
    if names is None:
        return ordered
    items = [t.strip().lower() for t in (names.split(",") if isinstance(names, str) else names) if str(t).strip()]
    unknown = [t for t in items if t not in available]
    if unknown:
        raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in ordered)}")
    return [s for s in ordered if s.name in items]


__all__ = ["INPUTS", "Column", "PackagedModel", "MetricSpec", "MetricInputs", "MetricInputMissing", "Collected",
           "collect",
           "compute_metric", "resolve_metrics"]
