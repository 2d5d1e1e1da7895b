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


# ---------------------------------------------------------------------------------------------- safe loading


def load_tensors(path: str | os.PathLike, what: str = "a checkpoint") -> Any:
    """The content of a PyTorch file (tensors, numbers, strings and containers), loaded with
    ``torch.load(weights_only=True)``, so nothing in the file runs.

    Refusals raise :class:`~ophav_core.errors.UnreadableCheckpoint` with one line naming the file and the
    problem: empty, truncated or not a PyTorch file, or holding Python objects beyond tensors. torch's own
    message for the last case suggests loading without the restriction; it is never passed on.

    what: what the file should be, for messages ("an ophav avatar", "the GFPGANv1.4.pth weights")."""
    import pickle
    import warnings
    import zipfile

    import torch

    from ophav_core.errors import UnreadableCheckpoint

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableCheckpoint(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise UnreadableCheckpoint(f"{path} is empty; it is not {what}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        objects = pickled_globals(path)
        if objects is None:
            raise UnreadableCheckpoint(f"{path} is not {what}: it is not a PyTorch file (neither a zip archive "
                                       f"nor a pickle)") from None
        if not objects:
            raise UnreadableCheckpoint(f"{path} is not {what}: it is a plain pickle, not a file written by "
                                       f"torch.save") from None
        named = ", ".join(objects[:3]) + (" ..." if len(objects) > 3 else "")
        raise UnreadableCheckpoint(f"{path} is not {what}: it holds Python objects that are not tensors ({named}), "
                                   f"which could run code, so ophav refused to load it") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError) as exc:
        raise UnreadableCheckpoint(f"{path} is not {what}: it is truncated or not a PyTorch file "
                                   f"({_first_sentence(exc)})") from None


def pickled_globals(path: str | os.PathLike) -> list[str] | None:
    """The Python globals (``module.name``) beyond torch's own that the pickles in ``path`` would import (a
    pickle, the ``data.pkl`` of a torch zip file, or the pickles one after another of torch's legacy format),
    read with :mod:`pickletools`, which decodes opcodes and never executes them; None when it is no pickle."""
    import io
    import pickletools
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return None
    found: list[str] = []
    stream = io.BytesIO(data)
    pickles = 0
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except (ValueError, EOFError, UnicodeDecodeError):
            break  # not a pickle (any more): the raw tensor bytes of the legacy format, or no pickle at all
        pickles += 1
    if not pickles:
        return None
    torch_own = ("torch.", "collections.OrderedDict")
    return [name for name in dict.fromkeys(found) if not name.startswith(torch_own)]


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of a library's message; never one of torch's that suggests ``weights_only=False``."""
    text = " ".join(str(exc).split())
    sentence = text.split(". ")[0][:160]
    if not sentence or "weights_only" in sentence:
        return type(exc).__name__
    return f"{type(exc).__name__}: {sentence}"
