"""`ophav run` and `ophav plugins`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer

from ophav_core.cli.root import _component_option, _echo, app
from ophav_core.plugins import get_host


# ---------------------------------------------------------------------------------------------- run


@app.command()
def run(
    portrait: Path = typer.Argument(..., help="the portrait photo (PNG, JPEG...)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default: runs/<portrait name>)"),
    image2video: Optional[str] = _component_option("image2video"),
    segmenter: Optional[str] = _component_option("segmenter"),
    tracker: Optional[str] = _component_option("tracker"),
    field: Optional[str] = _component_option("field"),
    restorer: Optional[str] = _component_option("restorer"),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=0, help="restore rounds (profile's if unset)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config file"),
    set_: List[str] = typer.Option([], "--set", help="KEY=VALUE, e.g. restorer.w=0.7 or rounds=3 (repeatable)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="tiny, preview, standard or paper"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    driver: Optional[str] = typer.Option(None, "--driver", help="driving video or motion script for the coarse video"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out"),
    reuse: List[Path] = typer.Option([], "--reuse", help="another run directory: take its finished steps that "
                                     "compute the same thing (e.g. the fit, for another restorer) instead of "
                                     "computing them (repeatable)"),
    stop_after: Optional[str] = typer.Option(None, "--stop-after", help="portrait, image2video, track, segment, fit or roundN"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Make an avatar from one portrait: coarse video, segmentation, tracking, training, restore rounds."""
    from ophav_core import api

    result = api.run(portrait, out, image2video=image2video, segmenter=segmenter, tracker=tracker, field=field,
                     restorer=restorer, rounds=rounds, config=config, sets=set_, profile=profile, device=device,
                     driver=driver, resume=resume, reuse=reuse, stop_after=stop_after, quiet=quiet, log=_echo)
    if result.stopped_after:
        _echo(f"stopped after {result.stopped_after}; inspect {result.run_dir} and continue with --resume")
    else:
        _echo(f"avatar: {result.avatar}\npreview: {result.run_dir / 'preview.mp4'}\nreport: {result.run_dir / 'report.html'}")


# ---------------------------------------------------------------------------------------------- plugins


def plugin_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from ophav_core import weights as store

    host = get_host()
    present = {row["name"]: row["state"] for row in store.status(host.weights)}
    rows = []
    for spec in host.registry:
        missing = spec.missing_requirements()
        weights = {w: present.get(w, "undeclared") for w in spec.weights}
        rows.append({"stage": spec.stage, "name": spec.name, "package": spec.package, "version": spec.version,
                     "plugin": spec.plugin, "summary": spec.summary, "missing_requirements": missing,
                     "weights": weights,
                     "ready": not missing and all(state == "present" for state in weights.values())})
    for metric in sorted(host.metrics.values(), key=lambda m: (m.order, m.name)):  # metrics are plugins too
        missing = metric.missing_requirements()
        weights = {w: present.get(w, "undeclared") for w in metric.weights}
        rows.append({"stage": "metric", "name": metric.name, "package": metric.package, "version": metric.version,
                     "plugin": metric.plugin, "summary": metric.summary or metric.definition,
                     "missing_requirements": missing, "weights": weights,
                     "ready": not missing and all(state == "present" for state in weights.values())})
    failures = [{"plugin": p.name, "package": p.package, "version": p.version, "error": p.error} for p in host.failures]
    return rows, failures


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every registered component by stage, and every metric, with its package, version and readiness."""
    rows, failures = plugin_rows()
    if as_json:
        typer.echo(json.dumps({"components": rows, "failures": failures}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    known = get_host().weights
    table = Table("stage", "name", "package", "version", "ready", "needs")
    for row in rows:
        needs = [f"pip: {m}" for m in row["missing_requirements"]]
        needs += [f"weights: {w} ({s}: {known[w].filename} from {known[w].url})" if w in known else f"weights: {w} ({s})"
                  for w, s in row["weights"].items() if s != "present"]
        table.add_row(row["stage"], row["name"], row["package"], row["version"], "yes" if row["ready"] else "no",
                      ", ".join(needs))
    console = Console()
    console.print(table)
    for failure in failures:
        console.print(f"[red]plugin {failure['plugin']} ({failure['package']} {failure['version']}) failed to load:"
                      f"[/red] {failure['error']}")
