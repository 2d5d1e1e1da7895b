"""The ``ophav`` command. The plugin manager is built inside commands, never at import.

Exit codes: 0 success, 2 usage or configuration errors (found before any work starts), 1 runtime failures,
130 interrupted. Errors print one readable line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import os
import sys

import typer

from ophav_core.errors import OphavError
from ophav_core.plugins import get_host

app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help="ophav: one portrait in, an animatable photo-realistic 3D head avatar out.")


def _echo(message: str) -> None:
    typer.echo(message, err=True)


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


# ---------------------------------------------------------------------------------------------- main


def _one_line(text: str) -> str:
    """A message on one line, without a leading ``error:`` of its own (a library's, or one re-raised)."""
    text = " ".join(text.split())
    while text.lower().startswith("error:"):
        text = text[len("error:"):].lstrip()
    return text


def unexpected_failure(exc: BaseException, limit: int = 300) -> str:
    """The line for an exception ophav did not anticipate: ophav's sentence, then the library's own message
    once, named by its module (``cv2.error``, not a bare ``error``), cut to ``limit`` characters."""
    kind = type(exc)
    module = kind.__module__.split(".")[0]
    name = kind.__name__ if module in ("builtins", "__main__") else f"{module}.{kind.__name__}"
    detail = _one_line(str(exc))
    if len(detail) > limit:
        detail = detail[:limit - 3].rstrip() + "..."
    said = f"{name}: {detail}" if detail else name
    return f"unexpected failure ({said}); run with --debug for the traceback"


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
        _echo(f"error: {_one_line(str(exc))}")
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
            _echo(f"error: {unexpected_failure(exc)}")
            code = 1
    sys.exit(code if isinstance(code, int) else 0)
