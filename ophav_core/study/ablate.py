"""``ophav ablate GRID.yaml``: a grid of normal runs, each evaluated, collected into a table and a plot.

A grid file::

    name: restorers-vs-rounds
    portraits: [astronaut.jpg, ../../shared/data/portraits/Julia_Roberts_crop.png]   # relative to this file
    drivers: [null]                 # optional: driving videos / motion scripts for the coarse video (null: built-in)
    base: {profile: preview}        # any run config (ophav run --config): profile, stages, options, seed...
    axes:                           # the cartesian product of these, times portraits x drivers
      restorer: [reference, {name: gfpgan, options: {w: 0.7}}]   # a stage: a name, or a name with options
      rounds: [0, 1, 2]             # a top-level field
      restorer.strength: [0.5, 1.0] # one option of the chosen component (the cell fails if it has no such option)
    eval: {every: 4, metrics: [psnr, ssim, lpips, csim], driver: null}

Every cell is a normal run directory ``STUDY/cells/<cell-id>/`` (``id`` = readable slug + short hash of what
the cell computes), holding besides the run its ``cell.json``, the ``config.yaml`` it ran with (usable as
``ophav run --config``), ``eval/metrics.json`` and ``result.json``. The evaluation of a cell (honest about what
it is): the final avatar re-renders every Nth frame of the cell's own coarse video at their tracked parameters
(PSNR/SSIM/LPIPS/FID against those frames: fidelity to the coarse video, which the avatar was trained on), CSIM
and the dlib identity distance against the portrait (identity preserved through the restore rounds), colour
drift, sharpness against the frames, detection rate, floaters, and AED/APD/AKD against the frames' tracking:
every registered metric, a third party's included, unless ``eval.metrics`` names some; with ``eval.driver``
also a cross-identity reenactment (``cross_*`` columns).

Shared work is done once: cells that differ only after some step (the restorer, the number of rounds) take
the finished steps they share from each other (the scheduler's step keys, see :mod:`ophav_core.pipeline.scheduler`), and
the executors start a cell only after the cell it shares the most steps with has finished. Three round counts
for two restorers train the first avatar once per portrait, not six times. ``--no-reuse`` computes every cell
from scratch (to measure how much runs vary, say).

Resumable: a cell whose ``result.json`` says done is not run again; a failed cell is recorded with its error
(``study.json``) and the others go on; it is retried (resuming its run) the next time. Executors: ``local``
(in this process, or ``--gpus N`` worker processes, one per GPU, with ``CUDA_VISIBLE_DEVICES`` set) and ``ray``
(each cell a Ray task needing one GPU where the cluster has GPUs; the study folder must be on storage that
every node sees).
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ophav_core.errors import OphavError, UsageError
from ophav_core.study.evaluation import column_info, parse_metrics
from ophav_core.study.metrics import Column
from ophav_core.registry import STAGE_KEYS

STUDY_VERSION = 1
OPTION_AXIS = re.compile(r"^(?P<stage>[a-z0-9_]+)\.(?P<option>[A-Za-z0-9_]+)$")


# ---------------------------------------------------------------------------------------------- the grid


class GridEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(4, ge=1, description="evaluate every Nth frame of the cell's coarse video")
    metrics: list[str] | None = Field(None, description="metrics to compute (default: every registered metric)")
    driver: str | None = Field(None, description="a driving video for a cross-identity evaluation of each cell")
    max_frames: int | None = Field(None, ge=1, description="at most this many evaluated frames per cell")

    @field_validator("metrics")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        try:
            return list(parse_metrics(value))
        except UsageError as exc:
            raise ValueError(str(exc)) from None


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="the study's name (default: the grid file's name)")
    portraits: list[str] = Field(..., min_length=1, description="portrait images, relative to the grid file")
    drivers: list[str | None] = Field(default_factory=lambda: [None],
                                      description="driving videos or motion scripts for the coarse video")
    base: dict[str, Any] = Field(default_factory=dict, description="the run config every cell starts from")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="axis -> values; cells = their product")
    eval: GridEval = Field(default_factory=GridEval)

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from ophav_core.config import RunConfig

        for key, values in axes.items():
            match = OPTION_AXIS.match(key)
            if key in STAGE_KEYS:
                for value in values:
                    if not (isinstance(value, str) or (isinstance(value, dict) and "name" in value
                                                       and set(value) <= {"name", "options"})):
                        raise ValueError(f"axis {key!r}: each value is a component name or {{name, options}}, "
                                         f"got {value!r}")
            elif match and match["stage"] in STAGE_KEYS:
                pass
            elif key not in RunConfig.model_fields or key in STAGE_KEYS:
                raise ValueError(f"axis {key!r} is neither a stage ({', '.join(STAGE_KEYS)}), a STAGE.OPTION nor "
                                 f"a run setting ({', '.join(k for k in RunConfig.model_fields if k not in STAGE_KEYS)})")
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return axes


def load_grid(path: Path) -> Grid:
    """The grid with every path made absolute (relative paths are relative to the grid file's folder)."""
    from ophav_core.config import format_validation, load_yaml_mapping

    path = Path(path)
    data = load_yaml_mapping(path, "grid")
    try:
        grid = Grid(**data)
    except ValidationError as exc:
        raise UsageError(format_validation(exc, f"grid {path}")) from None
    here = path.resolve().parent
    absolute = lambda p: str((here / p).resolve()) if p is not None else None  # noqa: E731
    grid.portraits = [absolute(p) for p in grid.portraits]
    grid.drivers = [absolute(d) for d in grid.drivers]
    if grid.eval.driver:
        grid.eval.driver = absolute(grid.eval.driver)
    if isinstance(grid.base.get("driver"), str):
        grid.base["driver"] = absolute(grid.base["driver"])
    grid.name = grid.name or path.stem
    for item in grid.portraits + [d for d in grid.drivers if d] + ([grid.eval.driver] if grid.eval.driver else []):
        if not Path(item).exists():
            raise UsageError(f"grid {path}: {item} does not exist")
    return grid


# ---------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One run of the grid: a portrait, a driver and one value per axis."""

    id: str
    portrait: str
    driver: str | None
    values: dict[str, Any]
    base: dict[str, Any]
    eval: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Cell":
        return cls(**data)

    def config_data(self) -> dict[str, Any]:
        """The cell's run config as ``ophav run --config`` reads it."""
        from ophav_core.config import DEFAULT_COMPONENTS

        data = json.loads(json.dumps(self.base))
        for stage in STAGE_KEYS:
            if isinstance(data.get(stage), str):
                data[stage] = {"name": data[stage]}
        # Components first, then their options: an option axis applies to whichever component the cell uses.
        for key, value in self.values.items():
            if key in STAGE_KEYS:
                data[key] = {"name": value} if isinstance(value, str) else {"name": value["name"],
                                                                            "options": dict(value.get("options", {}))}
            elif not OPTION_AXIS.match(key):
                data[key] = value
        for key, value in self.values.items():
            match = OPTION_AXIS.match(key)
            if match and key not in STAGE_KEYS:
                stage = data.setdefault(match["stage"], {"name": DEFAULT_COMPONENTS[match["stage"]]})
                stage.setdefault("options", {})[match["option"]] = value
        if self.driver is not None:
            data["driver"] = self.driver
        return data

    def label(self, keys: Iterable[str] | None = None) -> str:
        keys = list(self.values) if keys is None else list(keys)
        return ", ".join(f"{k}={value_label(self.values[k])}" for k in keys) or "base"


def value_label(value: Any) -> str:
    if isinstance(value, dict):
        options = ",".join(f"{k}={v}" for k, v in sorted(value.get("options", {}).items()))
        return f"{value['name']}({options})" if options else str(value["name"])
    return str(value)


def _slug(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
    return slug[:limit].rstrip("-") or "cell"


def _file_digest(path: str) -> str:
    from ophav_core.weights import sha256_of

    return sha256_of(Path(path))[:16] if Path(path).is_file() else str(path)


def expand(grid: Grid) -> list[Cell]:
    """Every cell: portraits x drivers x the product of the axes, in the order of the grid file."""
    keys = list(grid.axes)
    cells = []
    for portrait, driver in itertools.product(grid.portraits, grid.drivers):
        for combo in itertools.product(*(grid.axes[k] for k in keys)):
            values = dict(zip(keys, combo))
            # Files by content, so a moved checkout or study folder still finds its finished cells.
            identity = json.dumps({"portrait": _file_digest(portrait), "driver": driver and _file_digest(driver),
                                   "values": values, "base": grid.base}, sort_keys=True, default=str)
            digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
            parts = [Path(portrait).stem] + ([Path(driver).stem] if driver else [])
            parts += [f"{k.split('.')[-1]}-{value_label(v)}" for k, v in values.items()]
            cells.append(Cell(id=f"{_slug('_'.join(parts))}-{digest}", portrait=portrait, driver=driver,
                              values=values, base=grid.base, eval=grid.eval.model_dump()))
    return cells


def write_cell_files(cell: Cell, cell_dir: Path) -> None:
    """cell.json and config.yaml, before a cell is (re)run; removes the result of an earlier attempt."""
    import yaml

    from ophav_core.stages.data import atomic_write_bytes

    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "result.json").unlink(missing_ok=True)  # a stale result must not stand for this attempt
    atomic_write_bytes(cell_dir / "cell.json", (json.dumps(cell.to_json(), indent=2) + "\n").encode())
    atomic_write_bytes(cell_dir / "config.yaml", yaml.safe_dump(cell.config_data(), sort_keys=False).encode())


def check_cell(cell: Cell, cell_dir: Path, registry) -> str | None:
    """None when the cell's config resolves (components installed, options valid), else why not."""
    from ophav_core.config import build_config, resolve

    write_cell_files(cell, cell_dir)
    try:
        resolve(build_config(cell_dir / "config.yaml"), registry)
    except OphavError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- one cell


def _registry():
    from ophav_core.plugins import get_host

    return get_host().registry


def sibling_runs(cell_dir: Path) -> list[Path]:
    """The other cells of the study: the runs a cell may take finished steps from."""
    cell_dir = Path(cell_dir)
    return sorted(p for p in cell_dir.parent.iterdir() if p != cell_dir and (p / "manifest.json").is_file())


def run_cell(cell: Cell, cell_dir: Path, registry=None, device: str | None = None,
             reuse: bool = True) -> dict[str, Any]:
    """Run (or resume) the cell's run and evaluate it; never raises for a failure of the cell itself: the
    result says ``failed`` with the error. Writes ``result.json``. With ``reuse``, steps another cell of the
    study finished with the same key are taken from it."""
    from ophav_core.pipeline.scheduler import write_json

    cell_dir = Path(cell_dir)
    start = time.perf_counter()
    result: dict[str, Any] = {"cell": cell.id, "status": "running", "host": platform.node(), "pid": os.getpid(),
                              "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        result.update(_run_and_evaluate(cell, cell_dir, registry or _registry(), device, reuse))
        result["status"] = "done"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failed cell is recorded; the study goes on
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      traceback="".join(traceback.format_exception(exc)[-6:]))
    result["seconds"] = round(time.perf_counter() - start, 3)
    write_json(cell_dir / "result.json", result)
    return result


def _run_and_evaluate(cell: Cell, cell_dir: Path, registry, device: str | None, reuse: bool) -> dict[str, Any]:
    from ophav_core.study import evaluation
    from ophav_core.config import build_config, resolve
    from ophav_core.media import read_image, read_video
    from ophav_core.pipeline.scheduler import Scheduler

    write_cell_files(cell, cell_dir)
    resolved = resolve(build_config(cell_dir / "config.yaml"), registry)
    scheduler = Scheduler(cell_dir, resolved, Path(cell.portrait), resume=True, quiet=True, device=device,
                          reuse=sibling_runs(cell_dir) if reuse else ())
    run = scheduler.run()
    settings = cell.eval
    field_c, tracker = scheduler.component("field"), scheduler.component("tracker")
    avatar = field_c.load(run.avatar)
    portrait = read_image(cell.portrait)
    frames, masks, tracking, _ = evaluation.load_reference(cell_dir)
    results = [evaluation.self_reenactment(
        field_c, tracker, avatar, frames, masks, tracking, every=settings["every"], portrait=portrait,
        metrics=settings["metrics"], device=scheduler.device, label=cell.id, max_frames=settings.get("max_frames"))]
    metrics, missing = dict(results[0].metrics), dict(results[0].missing)
    if settings.get("driver"):
        video = read_video(settings["driver"], max_frames=settings.get("max_frames"))
        cross = evaluation.cross_reenactment(field_c, tracker, avatar, video, portrait,
                                             segmenter=scheduler.component("segmenter"), metrics=settings["metrics"],
                                             device=scheduler.device, label=cell.id)
        results.append(cross)
        metrics.update({f"cross_{k}": v for k, v in cross.metrics.items()})
        missing.update({f"cross_{k}": v for k, v in cross.missing.items()})
    evaluation.write_outputs(cell_dir / "eval", results, {"cell": cell.to_json()})
    return {"metrics": metrics, "missing": missing, "rounds": resolved.rounds, "avatar": str(run.avatar),
            "components": {s: r.spec.name for s, r in resolved.stages.items()},
            "reused": {step: info["from"] for step, info in scheduler.reused.items()},
            "reused_seconds": round(sum(info["seconds"] for info in scheduler.reused.values()), 3)}


# ---------------------------------------------------------------------------------------------- shared work


def cell_step_keys(cell: Cell, registry) -> list[str]:
    """The cell's step keys up to its last restore round (the export is each cell's own). The device is left
    as a placeholder: within one study every cell runs on the same kind of device."""
    from ophav_core.config import RunConfig, format_validation, resolve
    from ophav_core.pipeline.scheduler import step_keys

    try:
        config = RunConfig(**cell.config_data())
    except ValidationError as exc:
        raise UsageError(format_validation(exc, f"cell {cell.id}")) from None
    resolved = resolve(config, registry)
    keys = step_keys(resolved, Path(cell.portrait), device="study")
    return [key for name, key in keys.items() if name != "export"]


def reuse_plan(cells: list[Cell], keys: dict[str, list[str]]) -> tuple[list[Cell], dict[str, str | None]]:
    """The order to start cells in and, per cell, the cell it waits for: the one it shares the most leading
    steps with among the cells that come before it (fewer steps first, then grid order), so every shared step
    is computed once and never two cells compute it at the same time. Cells without keys wait for nothing."""
    index = {c.id: i for i, c in enumerate(cells)}
    order = sorted(cells, key=lambda c: (len(keys.get(c.id, [])), index[c.id]))
    provider: dict[str, str | None] = {}
    for position, cell in enumerate(order):
        mine, best, best_shared = keys.get(cell.id, []), None, 0
        for other in order[:position]:
            shared = 0
            for a, b in zip(mine, keys.get(other.id, [])):
                if a != b:
                    break
                shared += 1
            if shared > best_shared:
                best, best_shared = other.id, shared
        provider[cell.id] = best
    return order, provider


def plan_cells(cells: list[Cell], registry) -> tuple[list[Cell], dict[str, str | None]]:
    """:func:`reuse_plan` for these cells; a cell whose config does not resolve shares nothing."""
    keys = {}
    for cell in cells:
        try:
            keys[cell.id] = cell_step_keys(cell, registry)
        except OphavError:
            pass
    return reuse_plan(cells, keys)


class ReadyQueue:
    """Cells in plan order; one is handed out once the cell it waits for has finished (done or failed) or is
    not part of this execution."""

    def __init__(self, cells: list[Cell], waits_for: dict[str, str | None]):
        self.queue = list(cells)
        self.waits_for = waits_for
        self.unfinished = {c.id for c in cells}

    def __bool__(self) -> bool:
        return bool(self.queue)

    def take(self) -> Cell | None:
        for i, cell in enumerate(self.queue):
            if self.waits_for.get(cell.id) not in self.unfinished:
                return self.queue.pop(i)
        return None

    def finished(self, cell: Cell) -> None:
        self.unfinished.discard(cell.id)


# ---------------------------------------------------------------------------------------------- the study


@dataclass
class Study:
    """The study folder: ``study.json`` (every cell's status, written only by the coordinating process),
    ``cells/``, ``results.csv``, ``results.md`` and ``plot.png``."""

    root: Path
    grid: Grid
    cells: list[Cell]
    status: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, grid: Grid) -> "Study":
        root = Path(root).resolve()
        study = cls(root, grid, expand(grid))
        previous = root / "study.json"
        if previous.is_file():
            try:
                study.status = json.loads(previous.read_text()).get("cells", {})
            except (OSError, json.JSONDecodeError):
                study.status = {}
        for cell in study.cells:  # a result written by a worker counts even if study.json missed it
            result = study.read_result(cell)
            if result is not None:
                study.status[cell.id] = _summary(result)
        return study

    def cell_dir(self, cell: Cell) -> Path:
        return self.root / "cells" / cell.id

    def read_result(self, cell: Cell) -> dict[str, Any] | None:
        path = self.cell_dir(cell) / "result.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, cell: Cell) -> bool:
        result = self.read_result(cell)
        return result is not None and result.get("status") == "done"

    def pending(self, retry_failed: bool = True) -> list[Cell]:
        out = []
        for cell in self.cells:
            if self.is_done(cell):
                continue
            if not retry_failed and self.status.get(cell.id, {}).get("status") == "failed":
                continue
            out.append(cell)
        return out

    def record(self, cell: Cell, result: dict[str, Any]) -> None:
        from ophav_core.pipeline.scheduler import write_json

        if result.get("status") != "done" and not (self.cell_dir(cell) / "result.json").is_file():
            write_json(self.cell_dir(cell) / "result.json", result)  # the worker died before writing it
        self.status[cell.id] = _summary(result)
        self.save()

    def save(self) -> None:
        from ophav_core import __version__
        from ophav_core.pipeline.scheduler import write_json

        ids = {c.id for c in self.cells}
        write_json(self.root / "study.json", {
            "ophav": __version__, "study": STUDY_VERSION, "name": self.grid.name, "grid": self.grid.model_dump(),
            "counts": {s: sum(1 for k, v in self.status.items() if k in ids and v.get("status") == s)
                       for s in ("done", "failed", "running")},
            "cells": {k: v for k, v in self.status.items() if k in ids}})


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "error", "seconds", "host", "pid", "gpu", "rounds", "metrics", "reused_seconds")
    return {k: result[k] for k in keep if k in result}


# ---------------------------------------------------------------------------------------------- executors

OnResult = Callable[[Cell, dict[str, Any]], None]


def run_sequential(study: Study, cells: list[Cell], on_result: OnResult, registry=None,
                   device: str | None = None, reuse: bool = True) -> None:
    for cell in cells:  # the plan's order: whatever a cell waits for comes before it
        on_result(cell, run_cell(cell, study.cell_dir(cell), registry, device, reuse))


def run_processes(study: Study, cells: list[Cell], on_result: OnResult, gpus: int,
                  waits_for: dict[str, str | None] | None = None, reuse: bool = True, poll: float = 0.2) -> None:
    """One worker process per GPU (``CUDA_VISIBLE_DEVICES`` = its index), fed with the cells that are ready."""
    queue = ReadyQueue(cells, waits_for or {})
    running: dict[int, tuple[subprocess.Popen, Cell, Any]] = {}
    try:
        while queue or running:
            for slot in range(gpus):
                cell = queue.take() if slot not in running else None
                if cell is not None:
                    cell_dir = study.cell_dir(cell)
                    write_cell_files(cell, cell_dir)
                    log = open(cell_dir / "worker.log", "ab")
                    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(slot))
                    command = [sys.executable, "-m", "ophav_core.study.ablate", str(cell_dir)]
                    command += [] if reuse else ["--no-reuse"]
                    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                    running[slot] = (process, cell, log)
            for slot, (process, cell, log) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                del running[slot]
                result = study.read_result(cell)
                if result is None or result.get("status") == "running":
                    tail = (study.cell_dir(cell) / "worker.log").read_text(errors="replace")[-2000:]
                    result = {"cell": cell.id, "status": "failed",
                              "error": f"worker process exited with code {code} before recording a result",
                              "traceback": tail}
                queue.finished(cell)
                on_result(cell, result)
            time.sleep(poll)
    finally:
        for process, _, log in running.values():
            process.terminate()
            log.close()


def _ray_task(cell_json: dict[str, Any], cell_dir: str, reuse: bool = True) -> dict[str, Any]:
    """What a Ray worker runs (module-level, so workers import it by name)."""
    return run_cell(Cell.from_json(cell_json), Path(cell_dir), reuse=reuse)


def _ray_env() -> dict[str, str]:
    """Variables the workers need to see the same plugins, weights and test switches as this process."""
    return {k: v for k, v in os.environ.items() if k.startswith("OPHAV_") or k in ("XDG_CACHE_HOME",)}


def run_ray(study: Study, cells: list[Cell], on_result: OnResult, address: str | None = None,
            init_kwargs: dict[str, Any] | None = None, log: Callable[[str], None] = lambda m: None,
            waits_for: dict[str, str | None] | None = None, reuse: bool = True) -> None:
    """Each cell a Ray task (one GPU where the cluster has GPUs, else one CPU), submitted once the cell it waits
    for has finished; results as they finish."""
    try:
        import ray
    except ImportError:
        raise UsageError("--backend ray needs Ray: pip install 'ophav[ray]'") from None
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": _ray_env()}, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    kwargs.update(init_kwargs or {})
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise OphavError(f"cannot start or reach Ray ({address or 'a local instance'}): {exc}") from exc
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        resources = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
        log(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs; each cell asks for {resources}")
        remote = ray.remote(max_retries=0, **resources)(_ray_task)
        for cell in cells:
            write_cell_files(cell, study.cell_dir(cell))
        queue = ReadyQueue(cells, waits_for or {})
        pending: dict[Any, Cell] = {}

        def submit_ready() -> None:
            while (cell := queue.take()) is not None:
                pending[remote.remote(cell.to_json(), str(study.cell_dir(cell)), reuse)] = cell

        submit_ready()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                cell = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a worker that died or a task Ray could not run
                    result = {"cell": cell.id, "status": "failed", "error": f"ray: {type(exc).__name__}: {exc}"}
                queue.finished(cell)
                on_result(cell, result)
            submit_ready()
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------- results


def result_rows(study: Study) -> list[dict[str, Any]]:
    rows = []
    for cell in study.cells:
        result = study.read_result(cell) or study.status.get(cell.id) or {"status": "pending"}
        row: dict[str, Any] = {"cell": cell.id, "status": result.get("status", "pending"),
                               "portrait": Path(cell.portrait).stem, "driver": Path(cell.driver).stem if cell.driver else ""}
        for key, value in cell.values.items():
            row[key] = value_label(value)
        row["rounds_run"] = result.get("rounds")
        for name, value in (result.get("metrics") or {}).items():
            row[name] = value
        row["_metric_names"] = list(result.get("metrics") or {})
        row["_missing"] = result.get("missing") or {}
        row["seconds"] = result.get("seconds")
        row["reused_seconds"] = result.get("reused_seconds")
        row["error"] = result.get("error", "")
        rows.append(row)
    return rows


def _known_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Column names of the registered metrics in table order, then any other metric the rows carry (a plugin
    that is no longer installed)."""
    names = list(column_info())
    seen = set(names)
    for row in rows:
        for key in row.get("_metric_names", ()):
            base = key[6:] if key.startswith("cross_") else key
            if base not in seen:
                names.append(base)
                seen.add(base)
    return names


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    known = _known_columns(rows)
    names = [m for m in known if any(r.get(m) is not None for r in rows)]
    names += [f"cross_{m}" for m in known if any(r.get(f"cross_{m}") is not None for r in rows)]
    return names


def write_csv(path: Path, study: Study, rows: list[dict[str, Any]]) -> None:
    from ophav_core.stages.data import atomic_write_bytes

    columns = ["cell", "status", "portrait", "driver", *study.grid.axes, "rounds_run"]
    known = _known_columns(rows)
    columns += [m for m in [*known, *(f"cross_{m}" for m in known)] if any(m in r for r in rows)]
    columns += ["seconds", "reused_seconds", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    atomic_write_bytes(path, buffer.getvalue().encode())


def _column(metric: str) -> Column:
    name = metric[6:] if metric.startswith("cross_") else metric
    return column_info().get(name) or Column(name, name, True)


def _header(metric: str) -> str:
    return ("x-" if metric.startswith("cross_") else "") + _column(metric).header


def _fmt(metric: str, value: Any) -> str:
    return _column(metric).format(value)


def _mean(values: list[Any]) -> float | None:
    clean = [float(v) for v in values if v is not None]
    return sum(clean) / len(clean) if clean else None


def markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    """The mean over portraits (and drivers) per setting, then every cell, then the failures."""
    axes = list(study.grid.axes)
    metrics = metric_columns(rows)
    done = [r for r in rows if r["status"] == "done"]
    lines = [f"# Study {study.grid.name}", "",
             f"{len(done)} of {len(rows)} cells done; portraits: "
             f"{', '.join(sorted({r['portrait'] for r in rows}))}. Self-reenactment on the coarse-video frames "
             f"i % {study.grid.eval.every} == 0, CSIM against the portrait"
             + ("; x- columns: cross-identity reenactment" if any(m.startswith('cross_') for m in metrics) else "")
             + ".", ""]
    spent = sum(float(r["seconds"] or 0) for r in done)
    shared = sum(float(r.get("reused_seconds") or 0) for r in done)
    if done:
        lines += [f"The finished cells took {spent:.0f} s together; steps they took from each other instead of "
                  f"computing them again had cost {shared:.0f} s where they were computed.", ""]
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for row in done:
        settings.setdefault(tuple(row.get(a) for a in axes), []).append(row)
    if settings:
        lines += ["## Mean over portraits", "", "| " + " | ".join([*axes, "cells", *map(_header, metrics)]) + " |",
                  "|" + "|".join(["---"] * (len(axes) + 1) + ["---:"] * len(metrics)) + "|"]
        for key, group in settings.items():
            values = [_fmt(m, _mean([r.get(m) for r in group])) for m in metrics]
            lines.append("| " + " | ".join([*map(str, key), str(len(group)), *values]) + " |")
        lines.append("")
    lines += ["## Cells", "", "| " + " | ".join(["cell", "status", "portrait", *axes, *map(_header, metrics)]) + " |",
              "|" + "|".join(["---"] * (3 + len(axes)) + ["---:"] * len(metrics)) + "|"]
    for row in rows:
        values = [_fmt(m, row.get(m)) for m in metrics]
        lines.append("| " + " | ".join([row["cell"], row["status"], row["portrait"],
                                          *(str(row.get(a)) for a in axes), *values]) + " |")
    never = [m for m in dict.fromkeys(k for r in done for k in r.get("_metric_names", ())) if m not in metrics]
    if never:  # computed in no cell: say why instead of dropping the column silently
        lines += ["", "## Not computed in any cell", ""]
        for name in never:
            reason = next((r["_missing"][name] for r in done if name in r.get("_missing", {})), "no value")
            lines.append(f"- {_header(name)}: {' '.join(str(reason).split())[:300]}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed cells", ""] + [f"- `{r['cell']}`: {' '.join(str(r['error']).split())[:400]}"
                                                 for r in failed]
    return "\n".join(lines) + "\n"


def plot(path: Path, study: Study, rows: list[dict[str, Any]]) -> Path | None:
    """Each metric against the number of restore rounds, one line per setting of the other axes (the mean over
    portraits); None when nothing is done yet."""
    done = [r for r in rows if r["status"] == "done" and r.get("rounds_run") is not None]
    metrics = metric_columns(done)
    if not done or not metrics:
        return None
    try:
        import matplotlib
    except ImportError:  # the tables do not need it
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [a for a in study.grid.axes if a != "rounds"]
    series: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for row in done:
        name = ", ".join(f"{a}={row.get(a)}" for a in others) or "all"
        series.setdefault(name, {}).setdefault(int(row["rounds_run"]), []).append(row)
    columns = min(4, len(metrics))
    rows_n = (len(metrics) + columns - 1) // columns
    figure, axes = plt.subplots(rows_n, columns, figsize=(3.6 * columns, 3.0 * rows_n), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, by_rounds in series.items():
            xs = sorted(by_rounds)
            ys = [_mean([r.get(metric) for r in by_rounds[x]]) for x in xs]
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_title(_header(metric))
        ax.set_xlabel("restore rounds")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    figure.suptitle(f"{study.grid.name}: metrics vs restore rounds (mean over portraits)", fontsize=10)
    figure.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 4 if handles else 0), 1, 0.95))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    from ophav_core.stages.data import atomic_write_bytes

    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_results(study: Study, with_plot: bool = True) -> dict[str, Path | None]:
    """results.csv, results.md and (unless ``with_plot`` is False) plot.png from every cell's result."""
    from ophav_core.stages.data import atomic_write_bytes

    rows = result_rows(study)
    write_csv(study.root / "results.csv", study, rows)
    atomic_write_bytes(study.root / "results.md", markdown(study, rows).encode())
    return {"csv": study.root / "results.csv", "md": study.root / "results.md",
            "plot": plot(study.root / "plot.png", study, rows) if with_plot else None}


# ---------------------------------------------------------------------------------------------- one study


def run_study(grid_path: Path, out: Path, *, backend: str = "local", gpus: int = 0, address: str | None = None,
              retry_failed: bool = True, skip_invalid: bool = False, registry=None, device: str | None = None,
              ray_init: dict[str, Any] | None = None, log: Callable[[str], None] = lambda m: None,
              reuse: bool = True) -> Study:
    """Check every cell's config, run the cells not done yet, and write the results (also after failures)."""
    if backend not in ("local", "ray"):
        raise UsageError(f"--backend {backend!r}: choose local or ray")
    grid = load_grid(grid_path)
    study = Study.open(out, grid)
    study.root.mkdir(parents=True, exist_ok=True)
    (study.root / "grid.yaml").write_bytes(Path(grid_path).read_bytes())
    registry = registry or _registry()
    invalid = {}
    for cell in study.pending(retry_failed):
        problem = check_cell(cell, study.cell_dir(cell), registry)
        if problem:
            invalid[cell.id] = problem
    if invalid and not skip_invalid:
        by_problem: dict[str, list[str]] = {}
        for cell_id, problem in invalid.items():
            by_problem.setdefault(problem, []).append(cell_id)
        listing = "; ".join(f"{problem} ({len(ids)} cell(s), e.g. {ids[0]})" for problem, ids in by_problem.items())
        raise UsageError(f"{len(invalid)} cell(s) have an invalid config: {listing}. Fix the grid, or add "
                         f"--skip-invalid to record them as failed and run the rest")
    todo = []
    for cell in study.pending(retry_failed):
        if cell.id in invalid:
            study.record(cell, {"cell": cell.id, "status": "failed", "error": f"invalid config: {invalid[cell.id]}"})
        else:
            todo.append(cell)
    waits_for: dict[str, str | None] = {}
    if reuse and todo:
        todo, waits_for = plan_cells(todo, registry)
    skipped = len(study.cells) - len(todo) - len(invalid)
    log(f"study {grid.name}: {len(study.cells)} cells, {skipped} done earlier or skipped, {len(todo)} to run "
        f"({backend}{f', {gpus} GPU worker(s)' if backend == 'local' and gpus else ''})")

    finished = []

    def on_result(cell: Cell, result: dict[str, Any]) -> None:
        study.record(cell, result)
        finished.append(cell.id)
        state = f"{result.get('status')} {len(finished)}/{len(todo)}"
        done = result.get("status") == "done"
        detail = f" in {result.get('seconds', 0):.1f} s" if done else f": {result.get('error')}"
        if result.get("reused"):
            detail += (f" (took {len(result['reused'])} finished step(s) from other cells, "
                       f"{result.get('reused_seconds', 0):.1f} s of work)")
        log(f"[{state}] {cell.id}{detail}")
        write_results(study, with_plot=False)  # the tables stay current while the study runs

    for cell in todo:
        study.status[cell.id] = {"status": "running"}
    study.save()
    try:
        if backend == "ray":
            run_ray(study, todo, on_result, address, ray_init, log, waits_for, reuse)
        elif gpus > 0:
            run_processes(study, todo, on_result, gpus, waits_for, reuse)
        else:
            run_sequential(study, todo, on_result, registry, device, reuse)
    finally:
        for cell in todo:  # interrupted: what was not finished is not "running" any more
            if study.status.get(cell.id, {}).get("status") == "running":
                study.status[cell.id] = {"status": "pending"}
        study.save()
        write_results(study)
    return study


def _worker_main(argv: list[str]) -> int:
    """``python -m ophav_core.study.ablate CELL_DIR [--no-reuse]``: run one cell (the local multi-GPU executor's
    worker)."""
    reuse = "--no-reuse" not in argv
    argv = [a for a in argv if a != "--no-reuse"]
    if len(argv) != 1:
        print("usage: python -m ophav_core.study.ablate CELL_DIR [--no-reuse]", file=sys.stderr)
        return 2
    cell_dir = Path(argv[0])
    cell = Cell.from_json(json.loads((cell_dir / "cell.json").read_text()))
    result = run_cell(cell, cell_dir, reuse=reuse)
    return 0 if result["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
