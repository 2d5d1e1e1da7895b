"""`ophav ablate`: the grid, resumable studies with failures, the local executors and Ray, with the fakes."""
import csv
import json
import os

import numpy as np
import pytest

from ophav_core.study import ablate
from ophav_core.errors import UsageError
from ophav_core.media import save_png
from ophav_core.plugins import build_host
from ophav_core.testing import fakes
from ophav_core.testing.fakes import FakePlugin
from ophav_core.testing.synthetic import synthetic_portrait

FAKE_BASE = """
base:
  profile: tiny
  device: cpu
  image2video: fake
  segmenter: fake
  tracker: fake
  field: fake
  restorer: fake
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("OPHAV_TEST_FAKES", "1")
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("OPHAV_FAKE_CRASH", raising=False)
    fakes.CALLS.clear()
    for i in range(2):
        save_png(tmp_path / f"person{i}.png", synthetic_portrait(64, seed=i).image)
    return tmp_path


def write_grid(folder, axes: str, portraits=("person0.png", "person1.png"), extra: str = "") -> str:
    path = folder / "grid.yaml"
    path.write_text(f"name: test-study\nportraits: [{', '.join(portraits)}]\n{FAKE_BASE}\naxes:\n{axes}\n"
                    f"eval: {{every: 3}}\n{extra}")
    return path


def registry():
    return build_host(extra_plugins=[("fakes", FakePlugin())], load_entry_points=False).registry


TWO_BY_THREE = """  restorer: [fake, {name: fake, options: {gain: 20}}]
  rounds: [0, 1, 2]"""


def test_grid_expands_to_readable_stable_cells(env):
    grid = ablate.load_grid(write_grid(env, TWO_BY_THREE + '\n  "restorer.gain": [3]'))
    cells = ablate.expand(grid)
    assert len(cells) == 2 * 2 * 3
    assert len({c.id for c in cells}) == len(cells)
    assert [c.id for c in ablate.expand(ablate.load_grid(env / "grid.yaml"))] == [c.id for c in cells]  # stable
    first = cells[0]
    assert first.id.startswith("person0-restorer-fake-rounds-0-gain-3-") and first.portrait == str(env / "person0.png")
    config = cells[3].config_data()  # the restorer with options, then the option axis on top
    assert config["restorer"] == {"name": "fake", "options": {"gain": 3}} and config["rounds"] == 0
    assert config["profile"] == "tiny" and config["field"] == {"name": "fake"}


@pytest.mark.parametrize("axes, message", [("  colour: [1]", "axis 'colour'"),
                                           ("  restorer: [{label: x}]", "component name or {name, options}"),
                                           ("  rounds: []", "no values")])
def test_bad_grids_are_usage_errors(env, axes, message):
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        ablate.load_grid(write_grid(env, axes))


def test_missing_portrait_is_a_usage_error(env):
    with pytest.raises(UsageError, match="does not exist"):
        ablate.load_grid(write_grid(env, "  rounds: [0]", portraits=("nobody.png",)))


def test_invalid_cell_config_stops_before_any_work(env):
    grid = write_grid(env, '  restorer: [fake, fakke]')
    with pytest.raises(UsageError, match="Did you mean 'fake'"):
        ablate.run_study(grid, env / "study", registry=registry())
    assert fakes.CALLS["image2video"] == 0
    study = ablate.run_study(grid, env / "study", registry=registry(), skip_invalid=True)
    states = sorted(v["status"] for v in study.status.values())
    assert states == ["done", "done", "failed", "failed"]


def test_local_study_records_failures_resumes_and_reports(env, monkeypatch):
    grid = write_grid(env, TWO_BY_THREE)
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "refit")  # every cell with a restore round fails at its first refit
    study = ablate.run_study(grid, env / "study", registry=registry())
    status = {c.values["rounds"]: [] for c in study.cells}
    for cell in study.cells:
        status[cell.values["rounds"]].append(study.status[cell.id]["status"])
    assert status == {0: ["done"] * 4, 1: ["failed"] * 4, 2: ["failed"] * 4}
    failed = next(c for c in study.cells if c.values["rounds"] == 1)
    assert "simulated crash at refit" in study.status[failed.id]["error"]
    assert (env / "study" / "cells" / failed.id / "manifest.json").is_file()  # a normal run directory
    recorded = json.loads((env / "study/study.json").read_text())
    assert recorded["counts"] == {"done": 4, "failed": 8, "running": 0}

    monkeypatch.delenv("OPHAV_FAKE_CRASH")
    fakes.CALLS.clear()
    study = ablate.run_study(grid, env / "study", registry=registry())
    assert all(v["status"] == "done" for v in study.status.values())
    assert fakes.CALLS["image2video"] == 0  # failed cells resumed their runs; done cells were not rerun
    # Per portrait and restorer: refit1 once (the rounds-2 cell takes it from the rounds-1 cell), refit2 once.
    assert fakes.CALLS["fit0"] == 0 and fakes.CALLS["refit"] == 2 * 2 * 2

    with open(env / "study/results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {r["restorer"] for r in rows} == {"fake", "fake(gain=20)"}
    assert all(r["status"] == "done" and float(r["psnr"]) > 0 for r in rows)
    # The results are each cell's own evaluation.
    cell = study.cells[5]
    evaluated = json.loads((env / "study/cells" / cell.id / "eval/metrics.json").read_text())["results"][0]
    row = next(r for r in rows if r["cell"] == cell.id)
    assert float(row["psnr"]) == pytest.approx(evaluated["metrics"]["psnr"])
    assert evaluated["settings"]["identity_reference"] == "portrait"
    # The offline metrics are columns too (the fake renders hold no face a detector finds: detect rate 0).
    assert float(row["floaters"]) == pytest.approx(evaluated["metrics"]["floaters"])
    assert float(row["detect_rate"]) == 0.0 and row["identity"] == ""
    text = (env / "study/results.md").read_text()
    assert "## Mean over portraits" in text and "| fake(gain=20) | 2 | 2 |" in text
    assert "floaters↓" in text and "detect↑" in text
    assert "## Not computed in any cell" in text and "- ID dist↓: NoFaceFound: dlib finds no face" in text
    assert (env / "study/plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fakes.CALLS.clear()
    ablate.run_study(grid, env / "study", registry=registry())  # everything done: nothing runs
    assert sum(fakes.CALLS.values()) == 0


def test_cells_share_their_common_steps_and_wait_for_the_cell_that_computes_them(env):
    grid = write_grid(env, TWO_BY_THREE)
    study = ablate.Study.open(env / "study", ablate.load_grid(grid))
    keys = {c.id: ablate.cell_step_keys(c, registry()) for c in study.cells}
    order, waits_for = ablate.reuse_plan(study.cells, keys)
    by_id = {c.id: c for c in study.cells}

    def name(cell_id):
        cell = by_id[cell_id]
        restorer = ablate.value_label(cell.values["restorer"])
        return f"{cell.portrait[-5]}:{'B' if 'gain' in restorer else 'A'}{cell.values['rounds']}"

    assert [name(c.id) for c in order[:4]] == ["0:A0", "0:B0", "1:A0", "1:B0"]  # fewest steps first
    plan = {name(k): v and name(v) for k, v in waits_for.items()}
    assert plan == {"0:A0": None, "0:B0": "0:A0", "0:A1": "0:A0", "0:B1": "0:A1", "0:A2": "0:A1", "0:B2": "0:B1",
                    "1:A0": None, "1:B0": "1:A0", "1:A1": "1:A0", "1:B1": "1:A1", "1:A2": "1:A1", "1:B2": "1:B1"}
    for cell in order:  # whatever a cell waits for is started before it
        assert waits_for[cell.id] is None or order.index(by_id[waits_for[cell.id]]) < order.index(cell)

    queue = ablate.ReadyQueue(order, waits_for)
    first = [queue.take(), queue.take()]
    assert [name(c.id) for c in first] == ["0:A0", "1:A0"] and queue.take() is None  # the rest wait
    queue.finished(first[0])
    assert name(queue.take().id) == "0:B0"


@pytest.mark.parametrize("reuse", [True, False])
def test_a_study_trains_each_portrait_once_unless_told_not_to_reuse(env, reuse):
    grid = write_grid(env, TWO_BY_THREE)
    study = ablate.run_study(grid, env / "study", registry=registry(), reuse=reuse)
    assert all(v["status"] == "done" for v in study.status.values())
    if reuse:
        assert fakes.CALLS["image2video"] == 2 and fakes.CALLS["fit0"] == 2
        assert fakes.CALLS["refit"] == 2 * 2 * 2  # per portrait and restorer: refit1 once, refit2 once
        rounds2 = next(c for c in study.cells if c.values["rounds"] == 2)
        assert set(study.read_result(rounds2)["reused"]) >= {"fit", "refit1"}
        assert "from each other" in (env / "study/results.md").read_text()
    else:
        assert fakes.CALLS["image2video"] == 12 and fakes.CALLS["fit0"] == 12 and fakes.CALLS["refit"] == 2 * 2 * 3
    # The metrics do not depend on whether the steps were shared (the fakes are deterministic).
    rows = {r["cell"]: r["psnr"] for r in csv.DictReader(open(env / "study/results.csv"))}
    assert len(rows) == 12
    if reuse:
        return
    shared = ablate.run_study(grid, env / "shared", registry=registry(), reuse=True)
    assert {c.id: f"{float(shared.status[c.id]['metrics']['psnr']):.6f}" for c in shared.cells} == \
        {k: f"{float(v):.6f}" for k, v in rows.items()}


def test_gpu_worker_processes(env):
    grid = write_grid(env, "  rounds: [0, 1]", portraits=("person0.png",))
    study = ablate.run_study(grid, env / "study", gpus=2, registry=registry())
    results = [study.read_result(c) for c in study.cells]
    assert [r["status"] for r in results] == ["done", "done"]
    assert {r["gpu"] for r in results} <= {"0", "1"}
    assert all(r["pid"] != os.getpid() for r in results)  # they ran in worker processes
    assert fakes.CALLS["image2video"] == 0


@pytest.mark.slow
def test_ray_backend_with_a_local_instance(env, monkeypatch):
    pytest.importorskip("ray")
    grid = write_grid(env, TWO_BY_THREE, portraits=("person0.png", "person1.png"))
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "restore1")  # reaches the Ray workers through the runtime env
    study = ablate.run_study(grid, env / "study", backend="ray", registry=registry(),
                             ray_init={"num_cpus": 2, "include_dashboard": False})
    results = {c.id: study.read_result(c) for c in study.cells}
    by_rounds = {}
    for cell in study.cells:
        by_rounds.setdefault(cell.values["rounds"], set()).add(results[cell.id]["status"])
    # The fake restorer crashes at its first call in a process and does not count the crashed call: every
    # cell with a restore round fails, in whichever worker it runs.
    assert by_rounds == {0: {"done"}, 1: {"failed"}, 2: {"failed"}}
    assert all(r["pid"] != os.getpid() for r in results.values())
    assert fakes.CALLS["image2video"] == 0  # nothing ran in this process
    # Each portrait's second rounds-0 cell was submitted after the first had finished, and took its steps.
    reused = [results[c.id].get("reused", {}) for c in study.cells if c.values["rounds"] == 0]
    assert sorted(len(r) for r in reused) == [0, 0, 5, 5]
    rows = list(csv.DictReader(open(env / "study/results.csv")))
    assert len(rows) == 12 and (env / "study/plot.png").is_file()
    assert any(r["status"] == "failed" and "simulated crash" in r["error"] for r in rows)


def test_ablate_command(fakes_env, tmp_path, capsys, monkeypatch):
    from ophav_core.cli import main

    for i in range(2):
        save_png(tmp_path / f"person{i}.png", synthetic_portrait(64, seed=i).image)
    grid = write_grid(tmp_path, "  rounds: [0, 1]")

    def run(*args):
        with pytest.raises(SystemExit) as info:
            main(["ablate", str(grid), "--out", str(tmp_path / "s"), *args])
        captured = capsys.readouterr()
        return info.value.code, captured.out, captured.err

    code, out, _ = run("--dry-run")
    assert code == 0 and out.count("pending") == 4
    assert out.count("; after ") == 2  # each portrait's rounds-1 cell waits for its rounds-0 cell
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "refit")
    code, out, err = run("-q")
    assert code == 1 and "2 cell(s) failed" in err and "## Cells" in out
    monkeypatch.delenv("OPHAV_FAKE_CRASH")
    code, out, err = run("--keep-failed", "-q")
    assert code == 1  # failed cells kept as they are
    code, out, err = run("-q")
    assert code == 0, err
    assert out.count("| done |") == 4
    code, out, _ = run("--report-only")
    assert code == 0 and "Mean over portraits" in out
    code, out, _ = run("--dry-run")
    assert out.count("done") == 4
    assert np.isfinite([float(r["psnr"]) for r in csv.DictReader(open(tmp_path / "s/results.csv"))]).all()
