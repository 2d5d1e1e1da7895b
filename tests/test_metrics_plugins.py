"""Metrics as plugins: every shipped metric passes the contract, a third party's metric registers through the
hook and lands in the tables, the novel-view protocol writes its per-angle table and plot."""
import json

import numpy as np
import pytest

from ophav_core import hookimpl
from ophav_core.errors import OphavError, UsageError
from ophav_core.plugins import build_host, get_host
from ophav_core.study import evaluation as ev
from ophav_core.study.metrics import INPUTS, MetricInputs, MetricSpec, collect
from ophav_core.testing import contracts
from ophav_core.testing.fakes import FakePlugin


@pytest.fixture(scope="module")
def inputs():
    """Synthetic inputs with the fake tracker, so the tracker-based metrics run too."""
    from ophav_core.testing.fakes import FakeTracker

    data = contracts.synthetic_metric_inputs()
    tracker = FakeTracker(FakeTracker.Options(), contracts.tiny_context())
    given = {k: data.get(k) for k in INPUTS if k != "pred" and data.has(k)}
    return MetricInputs("self", data.pred, given={**given, "tracker": tracker})


def test_every_shipped_metric_passes_the_contract(inputs):
    metrics = get_host().metrics
    assert set(ev.PAPER_METRICS) | set(ev.VIEW_METRICS) | {"akd68"} <= set(metrics)
    computed = {}
    for spec in metrics.values():
        if spec.package == "ophav":
            computed.update(contracts.check_metric(spec, inputs))
    # Computable on the synthetic head without weights or faces: PSNR, SSIM, the tracker's transfer metrics,
    # detection (no face: 0) and floaters (the head is inside its region: 0).
    assert {"psnr", "ssim", "aed", "apd", "akd", "detect_rate", "floaters"} <= set(computed)
    assert (computed["psnr"] > 25).all() and (computed["detect_rate"] == 0).all() and (computed["floaters"] == 0).all()


def mouth_gap(inputs):
    return inputs.get("alpha").reshape(len(inputs), -1).mean(axis=1)


class ThirdParty:
    __ophav_package__ = "someone-elses-metrics"

    @hookimpl
    def register_metric(self, register):
        register(MetricSpec(name="coverage", compute=mouth_gap, higher_is_better=True, needs=("alpha",),
                            definition="mean render alpha (a test metric)"))


def test_a_third_party_metric_is_registered_selected_and_tabled():
    host = build_host(extra_plugins=[("fakes", FakePlugin()), ("theirs", ThirdParty())])
    spec = host.metrics["coverage"]
    assert spec.package == "someone-elses-metrics" and spec.header == "coverage↑"
    contracts.check_metric(spec)
    assert ev.parse_metrics("psnr,coverage", host.metrics) == ("psnr", "coverage")
    with pytest.raises(UsageError, match="unknown metric"):
        ev.parse_metrics("psnr,nope", host.metrics)
    data = contracts.synthetic_metric_inputs()
    result = collect([host.metrics["psnr"], spec], data)
    assert result.metrics["coverage"] == pytest.approx(float(data.get("alpha").mean()))
    row = ev.EvalResult("self", "mine", result.metrics, result.missing, result.per_frame, {}, data.pred,
                        columns=result.columns).to_json()
    assert "| Method | PSNR↑ | coverage↑ |" in ev.markdown_table([row])

    class Clash:
        @hookimpl
        def register_metric(self, register):
            register(MetricSpec(name="coverage", compute="x:y", higher_is_better=False, definition="other"))

    with pytest.raises(OphavError, match="two packages register the metric 'coverage'"):
        build_host(extra_plugins=[("theirs", ThirdParty()), ("clash", Clash())], load_entry_points=False)


def test_a_broken_metric_is_na_and_the_others_still_run():
    def broken(inputs):
        raise RuntimeError("oops")

    specs = [MetricSpec(name="broken", compute=broken, higher_is_better=True, definition="d"),
             MetricSpec(name="wrong_shape", compute=lambda i: np.zeros(len(i) + 1), higher_is_better=True,
                        definition="d"),
             MetricSpec(name="needs_pkg", compute=broken, higher_is_better=True, definition="d",
                        requires=("no_such_module_anywhere",), extra="eval")]
    result = collect(specs + [get_host().metrics["floaters"]], contracts.synthetic_metric_inputs())
    assert result.metrics["broken"] is None and "RuntimeError: oops" in result.missing["broken"]
    assert "one value per render" in result.missing["wrong_shape"]
    assert result.missing["needs_pkg"] == ("needs no_such_module_anywhere, which is not installed "
                                           "(pip install 'ophav[eval]')")
    assert result.metrics["floaters"] == 0.0


def test_score_images_gives_rows_per_image():
    data = contracts.synthetic_metric_inputs(3)
    result = ev.score_images(data.pred, data.get("portrait"), alpha=data.get("alpha"),
                             tracking=data.get("render_tracking"), metrics=["floaters", "detect_rate", "identity"])
    assert [r["frame"] for r in result.rows] == [0, 1, 2] and result.rows[0]["floaters"] == 0.0
    assert result.metrics["detect_rate"] == 0.0 and result.metrics["identity"] is None  # no face: n/a, not 0
