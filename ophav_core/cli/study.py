"""``ophav eval`` (the paper's metrics on an avatar) and ``ophav ablate`` (a grid of runs, evaluated)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ophav_core.cli.root import _component_option, _echo, app
from ophav_core.plugins import get_host


@app.command("eval")
def eval_command(
    avatars: List[Path] = typer.Argument(..., help="avatar checkpoint(s), e.g. runs/NAME/avatar/avatar.ckpt; one "
                                                   "table row each"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for metrics.json, table.md and compare.png"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="self-reenactment: a dataset (`ophav "
                                           "preprocess`), a run directory (its coarse video) or an INSTA-format "
                                           "folder (its held-out val and test frames)"),
    driver: Optional[Path] = typer.Option(None, "--driver", help="cross-identity reenactment: another person's video"),
    views: Optional[str] = typer.Option(None, "--views", help="novel views: turntable (yaw -60..60 step 15) or grid "
                                        "(those yaws x pitch -25..25 step 12.5); per-angle table and plot"),
    portrait: Optional[Path] = typer.Option(None, "--portrait", help="identity reference for identity, colour and "
                                            "CSIM (default: the run's portrait)"),
    every: int = typer.Option(10, "--every", min=1, help="self-reenactment: evaluate every Nth frame (the frames "
                              "`ophav fit --holdout N` leaves out)"),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="comma-separated metric names (default: every "
                                          "registered metric; with --views: identity, detect_rate, colour_drift, "
                                          "sharpness, floaters); `ophav plugins` lists them"),
    label: List[str] = typer.Option([], "--label", help="row name per avatar (default: the run's name)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="evaluate at most this many frames"),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="cross-identity and views: render resolution"),
    field: Optional[str] = _component_option("field"),
    tracker: Optional[str] = _component_option("tracker"),
    segmenter: Optional[str] = _component_option("segmenter"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Measure avatars with every registered metric (the paper's PSNR SSIM LPIPS FID CSIM AED APD AKD, the offline
    identity, akd68, colour drift, sharpness, detection rate and floaters, and any plugin's) and print Table 1."""
    from ophav_core import api

    table = api.evaluate(avatars, out, dataset=dataset, driver=driver, views=views, portrait=portrait, every=every,
                         metrics=metrics, labels=label, max_frames=max_frames, size=size, field=field,
                         tracker=tracker, segmenter=segmenter, device=device, quiet=quiet, log=_echo)
    typer.echo(table)
    extra = f", {out / 'views.md'}, {out / 'views.png'}" if views else ""
    _echo(f"wrote {out / 'metrics.json'}, {out / 'table.md'}{extra} and {out / 'compare.png'}")


@app.command()
def ablate(
    grid: Path = typer.Argument(..., help="the grid file (YAML): portraits, base config, axes, eval settings"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="study folder (default: studies/<grid name>)"),
    backend: str = typer.Option("local", "--backend", help="local or ray"),
    gpus: int = typer.Option(0, "--gpus", min=0, help="local: one worker process per GPU (0: run in this process)"),
    address: Optional[str] = typer.Option(None, "--address", help="ray: cluster address (auto, ray://host:10001); "
                                          "default: start a local instance"),
    retry_failed: bool = typer.Option(True, "--retry-failed/--keep-failed", help="run failed cells again"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="record cells with an invalid config as failed "
                                      "instead of stopping before any work"),
    report_only: bool = typer.Option(False, "--report-only", help="only rewrite results.csv/md and plot.png"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and exit"),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="cells take the finished steps they share from "
                               "each other (one first training per portrait for a grid over restorers and rounds)"),
    device: Optional[str] = typer.Option(None, "--device", help="local in-process runs: auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run and evaluate a grid of runs (components x options x restore rounds x portraits).

    Writes results.csv, results.md and plot.png in the study folder. Finished cells are kept: run the same
    command again to resume or to retry failed cells.
    """
    from ophav_core.study import ablate as study_lib

    out = out or Path("studies") / grid.stem
    if dry_run or report_only:
        study = study_lib.Study.open(out, study_lib.load_grid(grid))
        if dry_run:
            waits_for: dict = {}
            if reuse:
                _, waits_for = study_lib.plan_cells(study.pending(), get_host().registry)
            for cell in study.cells:
                state = "done" if study.is_done(cell) else study.status.get(cell.id, {}).get("status", "pending")
                after = f"; after {waits_for[cell.id]}" if waits_for.get(cell.id) else ""
                typer.echo(f"{state:8s} {cell.id}  ({cell.label()}{after})")
            return
        paths = study_lib.write_results(study)
        typer.echo((out / "results.md").read_text())
        _echo(f"wrote {paths['csv']}, {paths['md']}" + (f", {paths['plot']}" if paths["plot"] else ""))
        return
    from ophav_core import api

    study = api.ablate(grid, out, backend=backend, gpus=gpus, address=address, retry_failed=retry_failed,
                       skip_invalid=skip_invalid, reuse=reuse, device=device, quiet=quiet, log=_echo)
    typer.echo((study.root / "results.md").read_text())
    failed = [c.id for c in study.cells if study.status.get(c.id, {}).get("status") == "failed"]
    plot = study.root / "plot.png"
    _echo(f"results: {study.root / 'results.csv'}, {study.root / 'results.md'}"
          + (f", {plot}" if plot.is_file() else " (no plot: nothing finished yet, or matplotlib is not installed)"))
    if failed:
        _echo(f"{len(failed)} cell(s) failed (errors in {study.root / 'study.json'}); run again to retry them")
        raise typer.Exit(1)
