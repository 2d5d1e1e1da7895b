"""The weight store: one place for every weights file a plugin uses.

Files live in ``$OPHAV_WEIGHTS`` (default ``~/.cache/ophav/weights``), each under its registered file name.
Plugins declare what they need with :class:`WeightFile` through the ``register_weights`` hook; components ask
for a path with :func:`require`, which raises :class:`~ophav_core.errors.WeightsMissing` naming the file, its
source and where to put it. Nothing is downloaded unless the user runs ``ophav weights fetch``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ophav_core.errors import OphavError, UsageError, WeightsMissing


@dataclass(frozen=True)
class WeightFile:
    """name: the store's key (``gfpgan-v1.4``). filename: the public file name (``GFPGANv1.4.pth``).
    url: the official download address. sha256: the published (or well-known) checksum, '' if none.
    size: bytes, 0 if unknown. license: the weights' licence; restricted: True when the licence limits use
    (non-commercial, research only). needed_by: the component(s) using it. verify: ``"module:function"``
    taking the path and raising on a file that is not in the expected format (a strict structural load),
    used when no checksum is published."""

    name: str
    filename: str
    url: str
    license: str
    needed_by: str
    sha256: str = ""
    size: int = 0
    restricted: bool = False
    description: str = ""
    verify: str = ""
    plugin: str = ""


def store_dir() -> Path:
    env = os.environ.get("OPHAV_WEIGHTS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "ophav" / "weights"


def path_of(weight: WeightFile) -> Path:
    return store_dir() / weight.filename


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def missing_message(weight: WeightFile) -> str:
    return (f"weights file {weight.filename} for {weight.needed_by} is missing. Get it from {weight.url} "
            f"(licence: {weight.license}) and put it at {path_of(weight)}, or run "
            f"`ophav weights add {weight.name} /path/to/{weight.filename}` "
            f"(or `ophav weights fetch {weight.name}` where this machine can reach the address)")


def verify(weight: WeightFile, path: Path, full: bool = True) -> str | None:
    """None when ``path`` holds ``weight``, else why not. ``full=False`` checks size only (fast listing)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if weight.size and size != weight.size:
        return f"size {size} bytes, expected {weight.size}"
    if not full:
        return None
    if weight.sha256:
        actual = sha256_of(path)
        if actual != weight.sha256:
            return f"sha256 {actual[:12]}..., expected {weight.sha256[:12]}..."
    elif weight.verify:
        from ophav_core.registry import _resolve

        try:
            checker: Callable[[Path], Any] = _resolve(weight.verify)
            checker(path)
        except Exception as exc:  # noqa: BLE001 - any failure of the structural load means a wrong file
            return f"not a {weight.filename} ({type(exc).__name__}: {exc})"
    return None


def require(weight: WeightFile, explicit: str | os.PathLike | None = None) -> Path:
    """The path of ``weight`` (``explicit`` first, then the store); a clear error when it is absent."""
    path = Path(explicit).expanduser() if explicit else path_of(weight)
    if not path.is_file():
        if explicit:
            raise WeightsMissing(f"weights file {path} does not exist ({weight.filename} for {weight.needed_by}; "
                                 f"source: {weight.url})")
        raise WeightsMissing(missing_message(weight))
    return path


def add(weight: WeightFile, source: Path) -> Path:
    """Copy ``source`` into the store after checking that it is ``weight``; returns the stored path."""
    source = Path(source).expanduser()
    if not source.is_file():
        raise UsageError(f"{source} is not a file")
    problem = verify(weight, source)
    if problem:
        raise UsageError(f"{source} is not {weight.filename} for {weight.needed_by}: {problem}")
    target = path_of(weight)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def fetch(weight: WeightFile, url: str | None = None, quiet: bool = False, timeout: float = 60.0) -> Path:
    """Download ``weight`` from its official address (or ``url``) with a progress bar, verify it, store it."""
    import urllib.error
    import urllib.request

    from ophav_core.progress import progress_bar

    url = url or weight.url
    target = path_of(weight)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the user asked for this URL
            except (urllib.error.URLError, OSError) as exc:
                raise OphavError(f"cannot download {weight.filename} from {url}: {getattr(exc, 'reason', exc)}. "
                                 f"Download it elsewhere and run `ophav weights add {weight.name} FILE`") from exc
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress_bar(total, f"fetch {weight.filename}", disable=quiet) as bar:
                    while block := response.read(1 << 20):
                        out.write(block)
                        bar.advance(len(block))
        problem = verify(weight, Path(tmp))
        if problem:
            raise OphavError(f"downloaded {weight.filename} from {url} failed verification: {problem}; nothing was stored")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def status(weights: dict[str, WeightFile], full: bool = False) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(weights):
        weight = weights[name]
        path = path_of(weight)
        problem = verify(weight, path, full=full)
        state = "present" if problem is None else ("missing" if problem == "missing" else "corrupt")
        rows.append({"name": name, "file": weight.filename, "state": state, "problem": problem or "",
                     "path": str(path), "needed_by": weight.needed_by, "license": weight.license,
                     "restricted": weight.restricted, "url": weight.url})
    return rows
