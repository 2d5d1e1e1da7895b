"""The ``ophav`` command. The plugin manager is built inside commands, never at import.

Exit codes: 0 success, 2 usage or configuration errors (found before any work starts), 1 runtime failures,
130 interrupted. Errors print one readable line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from ophav_core.errors import OphavError, UsageError

app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="ophav: one portrait in, an animatable photo-realistic 3D head avatar out.")
weights_app = typer.Typer(no_args_is_help=True, help="The weight store: files that components with public weights need.")
app.add_typer(weights_app, name="weights")


def _echo(message: str) -> None:
    typer.echo(message, err=True)


def get_host():
    """The plugin host for this process (built once, on first use)."""
    global _HOST
    if _HOST is None:
        from ophav_core.plugins import build_host

        extra = []
        if os.environ.get("OPHAV_TEST_FAKES"):
            from ophav_core.testing.fakes import FakePlugin

            extra.append(("fakes", FakePlugin()))
        _HOST = build_host(extra_plugins=extra)
        if _HOST.failures:
            names = ", ".join(f.name for f in _HOST.failures)
            _echo(f"warning: plugin(s) {names} failed to load; `ophav plugins` says why")
    return _HOST


_HOST = None


def _complete(stage: str):
    def complete(incomplete: str) -> list[str]:
        try:
            return [n for n in get_host().registry.names(stage) if n.startswith(incomplete)]
        except Exception:  # completion must never crash the shell
            return []

    return complete


def _component_option(stage: str):
    return typer.Option(None, f"--{stage}", help=f"{stage} component (see `ophav plugins`)", autocompletion=_complete(stage))


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show tracebacks")) -> None:
    """ophav: one portrait in, an animatable photo-realistic 3D head avatar out."""


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
    from ophav_core.config import build_config, resolve
    from ophav_core.media import read_image
    from ophav_core.scheduler import Scheduler

    read_image(portrait)  # a missing or non-image portrait fails here, before anything is built
    flags = {"image2video": image2video, "segmenter": segmenter, "tracker": tracker, "field": field,
             "restorer": restorer, "rounds": rounds, "profile": profile, "device": device, "driver": driver}
    cfg = build_config(config, flags, set_)
    if cfg.driver is not None and not Path(cfg.driver).exists():
        raise UsageError(f"driver {cfg.driver} does not exist")
    resolved = resolve(cfg, get_host().registry)
    run_dir = out or Path("runs") / portrait.stem
    for other in reuse:
        if not (other / "manifest.json").is_file():
            raise UsageError(f"--reuse {other}: not a run directory (no manifest.json)")
    scheduler = Scheduler(run_dir, resolved, portrait, resume=resume, stop_after=stop_after, quiet=quiet,
                          log=(lambda m: None) if quiet else _echo, reuse=reuse)
    result = scheduler.run()
    if scheduler.reused:
        saved = sum(info["seconds"] for info in scheduler.reused.values())
        _echo(f"took {', '.join(scheduler.reused)} from another run ({saved:.0f} s of work not repeated)")
    elif reuse:
        _echo(f"warning: --reuse: no step of {', '.join(map(str, reuse))} computes the same as this run (another "
              f"portrait, profile, seed, device or tracker changes every step)")
    if result.stopped_after:
        _echo(f"stopped after {result.stopped_after}; inspect {run_dir} and continue with --resume")
    else:
        _echo(f"avatar: {result.avatar}\npreview: {run_dir / 'preview.mp4'}\nreport: {run_dir / 'report.html'}")


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
    failures = [{"plugin": p.name, "package": p.package, "version": p.version, "error": p.error} for p in host.failures]
    return rows, failures


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List every registered component by stage, with its package, version and readiness."""
    rows, failures = plugin_rows()
    if as_json:
        typer.echo(json.dumps({"components": rows, "failures": failures}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "name", "package", "version", "ready", "needs")
    for row in rows:
        needs = [f"pip: {m}" for m in row["missing_requirements"]]
        needs += [f"weights: {w} ({s})" for w, s in row["weights"].items() if s != "present"]
        table.add_row(row["stage"], row["name"], row["package"], row["version"], "yes" if row["ready"] else "no",
                      ", ".join(needs))
    console = Console()
    console.print(table)
    for failure in failures:
        console.print(f"[red]plugin {failure['plugin']} ({failure['package']} {failure['version']}) failed to load:"
                      f"[/red] {failure['error']}")


# ---------------------------------------------------------------------------------------------- weights


@weights_app.command("list")
def weights_list(as_json: bool = typer.Option(False, "--json"),
                 verify: bool = typer.Option(False, "--verify", help="check checksums / structure (slow)")) -> None:
    """Every weights file a plugin declares: present, missing or corrupt."""
    from ophav_core import weights as store

    rows = store.status(get_host().weights, full=verify)
    if as_json:
        typer.echo(json.dumps({"store": str(store.store_dir()), "files": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "file", "state", "needed by", "licence")
    for row in rows:
        licence = row["license"] + (" (restricted)" if row["restricted"] else "")
        table.add_row(row["name"], row["file"], row["state"] + (f": {row['problem']}" if row["state"] == "corrupt" else ""),
                      row["needed_by"], licence)
    console = Console()
    console.print(f"weight store: {store.store_dir()} (set OPHAV_WEIGHTS to move it)")
    console.print(table)


def _weight(name: str):
    import difflib

    weights = get_host().weights
    if name not in weights:
        close = difflib.get_close_matches(name, list(weights), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"no weights named {name!r}.{hint} Known: {', '.join(sorted(weights)) or 'none'}")
    return weights[name]


@weights_app.command("add")
def weights_add(name: str = typer.Argument(..., help="the weights' name (see `ophav weights list`)"),
                file: Path = typer.Argument(..., help="the file you downloaded")) -> None:
    """Copy a downloaded weights file into the store after verifying it."""
    from ophav_core import weights as store

    weight = _weight(name)
    if weight.restricted:
        _echo(f"note: {weight.filename} is under {weight.license}, which restricts its use")
    _echo(f"stored {store.add(weight, file)}")


@weights_app.command("fetch")
def weights_fetch(name: str = typer.Argument(...), url: Optional[str] = typer.Option(None, help="another address")) -> None:
    """Download a weights file from its official address, verify it and store it."""
    from ophav_core import weights as store

    weight = _weight(name)
    if weight.restricted:
        _echo(f"note: {weight.filename} is under {weight.license}, which restricts its use")
    _echo(f"stored {store.fetch(weight, url=url)}")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("OPHAV_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    if not debug:
        import warnings

        # A warning is for the person running the command: one line, without our source file and line.
        warnings.showwarning = lambda message, *_args, **_kwargs: _echo(f"warning: {message}")
    try:
        code = app(args=argv, prog_name="ophav", standalone_mode=False)
    except KeyboardInterrupt:
        _echo("interrupted; continue with the same command and --resume")
        code = 130
    except OphavError as exc:
        if debug:
            raise
        _echo(f"error: {exc}")
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        # Typer's (click's) own exceptions; recent Typer vendors click, so match them by shape, not by class.
        kind = type(exc).__name__
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            code = exc.exit_code
        elif kind == "Exit":
            code = getattr(exc, "exit_code", 0)
        elif kind == "Abort":
            _echo("aborted")
            code = 130
        elif debug:
            raise
        else:
            _echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)")
            code = 1
    sys.exit(code if isinstance(code, int) else 0)


# Commands that live in their own modules register themselves on `app` when imported here.
from ophav_core import cli_data as _cli_data  # noqa: E402,F401
from ophav_core import cli_study as _cli_study  # noqa: E402,F401
