"""report.html: what a run did, readable offline in a browser (images embedded, no external resources)."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ophav_core.stages.data import atomic_write_bytes

_FIGURES = [
    ("image2video/contact.png", "Coarse video (image2video): frames across the video"),
    ("track/pose.png", "Tracked head pose over the coarse video"),
    ("track/mesh.png", "Tracked face mesh on the frames"),
    ("segment/overlay.png", "Head masks (removed parts tinted red)"),
]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.92em}
th{background:#f4f4f4} figure{margin:1em 0} figure img{max-width:100%;border:1px solid #ccc}
figcaption{color:#555;font-size:.9em} .bar{background:#4a7bd0;height:.9em;display:inline-block;vertical-align:middle}
video{max-width:100%;border:1px solid #ccc} code{background:#f4f4f4;padding:0 .2em}
"""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(root: Path, manifest: dict[str, Any], timings: dict[str, float]) -> str:
    components = manifest.get("components", {})
    config = manifest.get("config", {})
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>ophav run report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>ophav run report</h1>",
             f"<p>Portrait <code>{html.escape(manifest.get('portrait', {}).get('path', ''))}</code>, profile "
             f"<b>{html.escape(str(config.get('profile')))}</b>, {config.get('rounds')} restore round(s), device "
             f"<b>{html.escape(str(manifest.get('device')))}</b>, ophav {html.escape(str(manifest.get('ophav')))}, "
             f"started {html.escape(str(manifest.get('created')))}.</p>"]
    if (root / "preview.mp4").exists():
        parts.append("<h2>The avatar</h2><video controls loop muted autoplay src=\"preview.mp4\"></video>"
                     "<p>The portrait beside the avatar turning its head and going through expressions "
                     "(<code>preview.mp4</code>).</p>")
    rows = [(html.escape(stage), html.escape(c.get("name", "")), html.escape(c.get("package", "")),
             html.escape(str(c.get("version", "")))) for stage, c in components.items()]
    parts += ["<h2>Components</h2>", _table(rows, ("stage", "component", "package", "version"))]
    total = sum(timings.values()) or 1.0
    longest = max(timings.values(), default=1.0) or 1.0
    steps = manifest.get("steps", {})

    def note(step: str) -> str:
        taken = steps.get(step, {}).get("reused")
        if not taken:
            return ""
        return (f"taken from <code>{html.escape(str(taken.get('from', '')))}</code> "
                f"({float(taken.get('seconds', 0)):.1f} s there)")

    rows = [(html.escape(step), f"{seconds:.1f}", f'<span class="bar" style="width:{300 * seconds / longest:.0f}px"></span>',
             note(step)) for step, seconds in timings.items()]
    parts += ["<h2>Timings</h2>", _table(rows, ("step", "seconds", "", "")), f"<p>Total {total:.1f} s.</p>"]
    parts.append("<h2>Stages</h2>")
    for rel, caption in _FIGURES:
        if (root / rel).exists():
            parts.append(_img(root / rel, caption))
    for folder in sorted(root.glob("round*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 0):
        if (folder / "contact.png").exists():
            parts.append(_img(folder / "contact.png", f"{folder.name}: renders of the avatar before and after the restorer"))
    parts += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>", "</body></html>"]
    return "\n".join(parts)


def write_report(root: Path, manifest: dict[str, Any], timings: dict[str, float]) -> Path:
    path = root / "report.html"
    atomic_write_bytes(path, render_report(root, manifest, timings).encode())
    return path
