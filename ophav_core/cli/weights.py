"""`ophav weights`: the store of files that components with public weights need."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ophav_core.cli.root import _echo, app
from ophav_core.errors import UsageError
from ophav_core.plugins import get_host

weights_app = typer.Typer(no_args_is_help=True, help="The weight store: files that components with public weights need.")
app.add_typer(weights_app, name="weights")


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
