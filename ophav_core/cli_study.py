"""``ophav eval`` (the paper's metrics on an avatar) and ``ophav ablate`` (a grid of runs, evaluated)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ophav_core.cli import _component_option, _echo, app, get_host
from ophav_core.errors import UsageError


def _label_for(avatar: Path) -> str:
    """runs/NAME/avatar/avatar.ckpt -> NAME; a step's checkpoint inside a run (runs/NAME/round1/avatar.ckpt,
    runs/NAME/fit/avatar.ckpt) -> NAME/round1, NAME/fit; anything else -> the file's stem."""
    run = avatar.parent.parent
    if avatar.parent.name == "avatar" and avatar.stem == "avatar":
        return run.name or avatar.stem
    if avatar.stem == "avatar" and (run / "manifest.json").is_file():
        return f"{run.name}/{avatar.parent.name}"
    return avatar.stem


@app.command("eval")
def eval_command(
    avatars: List[Path] = typer.Argument(..., help="avatar checkpoint(s), e.g. runs/NAME/avatar/avatar.ckpt; one "
                                                   "table row each"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for metrics.json, table.md and compare.png"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="self-reenactment: a dataset (`ophav "
                                           "preprocess`) or a run directory (its coarse video)"),
    driver: Optional[Path] = typer.Option(None, "--driver", help="cross-identity reenactment: another person's video"),
    portrait: Optional[Path] = typer.Option(None, "--portrait", help="identity reference for CSIM (default in "
                                            "--driver mode: the run's portrait)"),
    every: int = typer.Option(10, "--every", min=1, help="self-reenactment: evaluate every Nth frame (the frames "
                              "`ophav fit --holdout N` leaves out)"),
    metrics: str = typer.Option("psnr,ssim,lpips,fid,csim,aed,apd,akd", "--metrics", help="comma-separated"),
    label: List[str] = typer.Option([], "--label", help="row name per avatar (default: the run's name)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="evaluate at most this many frames"),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="cross-identity: render resolution"),
    field: Optional[str] = _component_option("field"),
    tracker: Optional[str] = _component_option("tracker"),
    segmenter: Optional[str] = _component_option("segmenter"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Measure avatars with the paper's metrics (PSNR SSIM LPIPS FID CSIM AED APD AKD) and print Table 1."""
    from ophav_core import evaluation
    from ophav_core.cli_data import _avatar_description, _context, _create
    from ophav_core.config import DEFAULT_COMPONENTS
    from ophav_core.media import read_image, read_video

    if (dataset is None) == (driver is None):
        raise UsageError("give --dataset DIR (self-reenactment) or --driver VIDEO (cross-identity reenactment)")
    if label and len(label) != len(avatars):
        raise UsageError(f"{len(label)} --label for {len(avatars)} avatar(s)")
    wanted = evaluation.parse_metrics(metrics)
    for avatar in avatars:
        if not avatar.is_file():
            raise UsageError(f"avatar {avatar} does not exist")
    reference = evaluation.load_reference(dataset) if dataset is not None else None
    video = read_video(driver, max_frames=max_frames) if driver is not None else None
    explicit_portrait = read_image(portrait) if portrait is not None else None
    context = _context(out / ".work", "standard", device, quiet)  # components' scratch space
    results = []
    for i, avatar in enumerate(avatars):
        meta = _avatar_description(avatar)
        components = meta.get("components", {})
        field_c, _ = _create("field", field or meta.get("field") or DEFAULT_COMPONENTS["field"], [], context)
        tracker_c, _ = _create("tracker", tracker or meta.get("tracker") or DEFAULT_COMPONENTS["tracker"], [], context)
        ckpt = field_c.load(avatar)
        name = label[i] if label else _label_for(avatar)
        person = explicit_portrait
        if person is None and video is not None and meta.get("portrait") and Path(meta["portrait"]).is_file():
            person = read_image(meta["portrait"])
        if reference is not None:
            frames, masks, tracking, _ = reference
            result = evaluation.self_reenactment(field_c, tracker_c, ckpt, frames, masks, tracking, every=every,
                                                 portrait=person, metrics=wanted, device=context.device, label=name,
                                                 max_frames=max_frames)
        else:
            segmenter_c, _ = _create("segmenter", segmenter or components.get("segmenter")
                                     or DEFAULT_COMPONENTS["segmenter"], [], context)
            result = evaluation.cross_reenactment(field_c, tracker_c, ckpt, video, person, segmenter=segmenter_c,
                                                  metrics=wanted, device=context.device, label=name,
                                                  resolution=(size, size) if size else None)
        result.settings["avatar"] = str(avatar)
        result.settings["source"] = str(dataset or driver)
        results.append(result)
        if not quiet:
            _echo(f"evaluated {name}")
    table = evaluation.write_outputs(out, results)
    typer.echo(table)
    _echo(f"wrote {out / 'metrics.json'}, {out / 'table.md'} and {out / 'compare.png'}")


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
    from ophav_core import ablate as study_lib

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
    log = (lambda m: None) if quiet else _echo
    study = study_lib.run_study(grid, out, backend=backend, gpus=gpus, address=address, retry_failed=retry_failed,
                                skip_invalid=skip_invalid, registry=get_host().registry, device=device, log=log,
                                reuse=reuse)
    typer.echo((study.root / "results.md").read_text())
    failed = [c.id for c in study.cells if study.status.get(c.id, {}).get("status") == "failed"]
    plot = study.root / "plot.png"
    _echo(f"results: {study.root / 'results.csv'}, {study.root / 'results.md'}"
          + (f", {plot}" if plot.is_file() else " (no plot: nothing finished yet, or matplotlib is not installed)"))
    if failed:
        _echo(f"{len(failed)} cell(s) failed (errors in {study.root / 'study.json'}); run again to retry them")
        raise typer.Exit(1)
