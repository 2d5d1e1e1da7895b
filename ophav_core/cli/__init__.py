"""The ``ophav`` command: a thin layer over :mod:`ophav_core.api`. One typer app (:mod:`.root`); each command group
lives in its own module and registers on it when imported here."""
from ophav_core.cli.root import app, main
from ophav_core.cli import data, run, study, weights  # noqa: F401 - registers the commands on `app`

__all__ = ["app", "main"]
