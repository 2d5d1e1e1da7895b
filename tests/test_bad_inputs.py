"""Unusual portraits and files get one clear line (issue 19).

Every case runs the ``ophav`` command in this process and checks: the exit code, that the message names the file
and the problem, that no traceback is printed without --debug, that no error line nests ``error:``, and that
nothing is written outside --out. Inputs are made here, in tmp_path; big pictures are made cheaply (a PNG whose
header claims 60000x60000 over a few compressed rows). Reading cases use the fake components; the cases about
faces run the real tiny pipeline on the shared portraits (skipped where ../shared/data is absent).
"""
from __future__ import annotations

import io
import pathlib
import pickle
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from ophav_core.cli import main

FAKES = ["--image2video", "fake", "--segmenter", "fake", "--tracker", "fake", "--field", "fake",
         "--restorer", "fake", "--profile", "tiny", "--device", "cpu", "-q"]


# ---------------------------------------------------------------------------------------------- inputs


def _portrait_rgb(size: int = 64) -> np.ndarray:
    from ophav_core.testing.synthetic import synthetic_portrait

    return synthetic_portrait(size).image


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    from PIL import Image

    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, **kwargs)
    return path


def png_claiming(path: Path, width: int, height: int, rows: int = 8) -> Path:
    """A PNG whose header says ``width`` x ``height`` (8-bit grey) over only ``rows`` rows of zeros, compressed:
    a few kB on disk that a decoder would expand to width x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress((b"\x00" * (width + 1)) * rows, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def empty(tmp: Path) -> Path:
    path = tmp / "empty.png"
    path.write_bytes(b"")
    return path


def huge_png(tmp: Path) -> Path:
    return png_claiming(tmp / "huge.png", 60000, 60000)


def not_an_image(tmp: Path) -> Path:
    path = tmp / "notes.png"
    path.write_text("these are notes, not a picture\n")
    return path


def truncated_png(tmp: Path) -> Path:
    data = _save(tmp / "whole.png", _portrait_rgb()).read_bytes()
    (tmp / "whole.png").unlink()
    path = tmp / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_jpeg(tmp: Path) -> Path:
    data = _save(tmp / "whole.jpg", _portrait_rgb(), quality=90).read_bytes()
    (tmp / "whole.jpg").unlink()
    path = tmp / "cut.jpg"
    path.write_bytes(data[: int(len(data) * 0.7)])
    return path


def tiny_8x8(tmp: Path) -> Path:
    return _save(tmp / "eight.png", np.full((8, 8, 3), 128, np.uint8))


def big_jpeg(tmp: Path) -> Path:
    """9000x9000 (81 megapixels, under the limit): one grey colour, which JPEG stores in a few hundred kB."""
    from PIL import Image

    path = tmp / "big.jpg"
    Image.new("L", (9000, 9000), 128).save(path, quality=50)
    return path


def grey_png(tmp: Path) -> Path:
    return _save(tmp / "grey.png", _portrait_rgb(), "L")


def cmyk_jpeg(tmp: Path) -> Path:
    return _save(tmp / "cmyk.jpg", _portrait_rgb(), "CMYK")


def palette_png(tmp: Path) -> Path:
    return _save(tmp / "palette.png", _portrait_rgb(), "P")


def png_16bit(tmp: Path) -> Path:
    from PIL import Image

    grey = (_portrait_rgb().mean(axis=2) * 257).astype(np.uint16)
    path = tmp / "sixteen.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return path


def rgba_png(tmp: Path) -> Path:
    image = np.dstack([_portrait_rgb(), np.full((64, 64), 255, np.uint8)])
    image[:8, :8] = (0, 0, 0, 0)  # a transparent corner, black underneath: must come out white
    return _save(tmp / "cutout.png", image)


def exif_rotated_jpeg(tmp: Path) -> Path:
    """Stored 64 wide x 48 high with EXIF orientation 6 (turn 90 degrees clockwise to view): read as 48x64."""
    from PIL import Image

    image = Image.fromarray(np.full((48, 64, 3), 128, np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp / "exif.jpg"
    image.save(path, exif=exif)
    return path


def landscape_without_face(tmp: Path) -> Path:
    y, x = np.mgrid[0:48, 0:64]
    sky = np.stack([x * 3, y * 4, 200 - y * 2], axis=2).clip(0, 255).astype(np.uint8)
    return _save(tmp / "landscape.png", sky)


# ---------------------------------------------------------------------------------------------- checkpoints


class _TouchOnLoad:
    """Unpickling this would create ``marker``: a loader that runs code from the file would show it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def hostile_pickle(tmp: Path) -> Path:
    path = tmp / "hostile.ckpt"
    path.write_bytes(pickle.dumps({"format": "ophav-insta", "field": _TouchOnLoad(tmp / "code-ran")}))
    return path


def hostile_torch_file(tmp: Path) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save({"field": {"w": torch.zeros(2)}, "payload": _TouchOnLoad(tmp / "code-ran")}, buffer)
    path = tmp / "hostile_zip.ckpt"
    path.write_bytes(buffer.getvalue())
    return path


def random_bytes(tmp: Path) -> Path:
    path = tmp / "random.ckpt"
    path.write_bytes(np.random.default_rng(19).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    make: Callable[[Path], Path]
    command: str  # "run" or "render"
    code: int
    says: tuple[str, ...] = ()  # in the error line (or, for code 0, in a warning line)
    extra: tuple[str, ...] = ()
    check: Callable[[Path, Path], None] | None = None  # (input, out) -> asserts on what was written
    never: tuple[str, ...] = field(default=("weights_only", "error: error:", "Traceback"))


def _portrait_written(out: Path) -> np.ndarray:
    from ophav_core.stages import Portrait

    return Portrait.load(out / "input" / "portrait.npz").image


def _white_corner(_input: Path, out: Path) -> None:
    image = _portrait_written(out)
    assert (image[:8, :8] == 255).all() and image[20:40, 20:40].std() > 0


def _upright_exif(_input: Path, out: Path) -> None:
    assert _portrait_written(out).shape == (64, 48, 3)


def _grey_kept(_input: Path, out: Path) -> None:
    image = _portrait_written(out).astype(int)
    assert image.shape[2] == 3 and (image[..., 0] == image[..., 1]).all() and image.std() > 10


def _nothing_ran(input_: Path, _out: Path) -> None:
    assert not (input_.parent / "code-ran").exists(), "code from the checkpoint was executed"


STOP = ["--stop-after", "portrait"]
READING = [
    Case("empty file", empty, "run", 2, ("is empty",)),
    Case("60000x60000 PNG", huge_png, "run", 2, ("is 60000x60000", "the largest portrait ophav reads is",
                                                  "megapixels")),
    Case("not an image", not_an_image, "run", 2, ("not an image that can be read",)),
    Case("truncated PNG", truncated_png, "run", 0, ("truncated",), STOP),
    Case("truncated JPEG", truncated_jpeg, "run", 0, ("truncated",), STOP),
    Case("8x8 image", tiny_8x8, "run", 2, ("is 8x8", "smallest")),
    Case("greyscale PNG", grey_png, "run", 0, (), STOP, _grey_kept),
    Case("CMYK JPEG", cmyk_jpeg, "run", 0, (), STOP),
    Case("palette PNG", palette_png, "run", 0, (), STOP),
    Case("16-bit PNG", png_16bit, "run", 0, (), STOP, _grey_kept),
    Case("alpha PNG composited over white", rgba_png, "run", 0, (), STOP, _white_corner),
    Case("EXIF orientation", exif_rotated_jpeg, "run", 1, ("no face",)),
    Case("pickle carrying code", hostile_pickle, "render", 1,
         ("is not an ophav avatar", "Python objects that are not tensors", "refused"), check=_nothing_ran),
    Case("torch file carrying code", hostile_torch_file, "render", 1,
         ("is not an ophav avatar", "Python objects that are not tensors", "refused"), check=_nothing_ran),
    Case("random bytes as a checkpoint", random_bytes, "render", 1, ("is not an ophav avatar", "not a PyTorch file")),
]


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def check_one_line(code: int, err: str, input_: Path, case: Case) -> None:
    for bad in case.never:
        assert bad not in err, f"{case.name}: {bad!r} in {err!r}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    others = [line for line in err.splitlines() if not line.startswith(("error:", "warning:", "stopped after"))]
    assert not others, f"{case.name}: unexpected output {others}"
    assert code == case.code, f"{case.name}: exit {code}, expected {case.code}: {err}"
    said = errors if code else [line for line in err.splitlines() if line.startswith("warning:")]
    if code:
        assert len(errors) == 1, f"{case.name}: {errors}"
    if case.says:
        assert len(said) >= 1 and str(input_) in said[0], f"{case.name}: the line does not name {input_}: {said}"
        for phrase in case.says:
            assert phrase in said[0], f"{case.name}: {phrase!r} not in {said[0]!r}"


@pytest.mark.parametrize("case", READING, ids=[c.name for c in READING])
def test_bad_input_gets_one_clear_line(case, fakes_env, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a stray write to the working directory is seen too
    source = case.make(tmp_path)
    out = tmp_path / "out"
    before = _files_under(tmp_path)
    start = time.perf_counter()
    if case.command == "run":
        argv = ["run", str(source), "--out", str(out), *FAKES, *case.extra]
    else:
        argv = ["render", str(source), "--views", "turntable", "--field", "insta", "--tracker", "fake",
                "--out", str(out / "turn.mp4")]
    code, err = run_cli(argv, capsys)
    seconds = time.perf_counter() - start
    check_one_line(code, err, source, case)
    written = _files_under(tmp_path) - before
    outside = sorted(str(p) for p in written if out not in p.parents and p != out and p != tmp_path / "weights")
    assert not outside, f"{case.name}: written outside --out: {outside}"
    if case.check:
        case.check(source, out)
    if case.name.startswith("60000"):
        assert seconds < 2.0, "the 60000x60000 PNG was decoded before being refused"


def test_a_9000x9000_jpeg_is_read(tmp_path):
    """Under the limit: read whole (through the CLI the fake pipeline would spend its time on 81 megapixels)."""
    from ophav_core.media import read_portrait

    portrait = read_portrait(big_jpeg(tmp_path))
    assert portrait.image.shape == (9000, 9000, 3) and portrait.source == str(tmp_path / "big.jpg")


def test_the_error_formatter_never_nests_error_and_names_the_library():
    import cv2

    from ophav_core.cli.root import unexpected_failure

    try:
        cv2.imdecode(np.zeros(0, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        line = unexpected_failure(exc)
    assert line.startswith("unexpected failure (cv2.error: OpenCV") and "\n" not in line
    assert "error: error" not in f"error: {line}" and line.count("--debug") == 1


def test_debug_shows_the_traceback(fakes_env, tmp_path, capsys):
    source = empty(tmp_path)
    with pytest.raises(Exception, match="is empty"):
        main(["--debug", "run", str(source), "--out", str(tmp_path / "out"), *FAKES])


# ---------------------------------------------------------------------------------------------- render a run


def test_render_takes_a_run_directorys_avatar(fakes_env, portrait_file, tmp_path, capsys):
    run_dir = tmp_path / "runs" / "me"
    code, err = run_cli(["run", str(portrait_file), "--out", str(run_dir), *FAKES, "--rounds", "1"], capsys)
    assert code == 0, err
    clip = tmp_path / "clip" / "turn.mp4"
    before = _files_under(tmp_path)
    code, err = run_cli(["render", str(run_dir), "--views", "turntable", "--seconds", "0.4", "--out", str(clip)],
                        capsys)
    assert code == 0, err
    assert clip.is_file() and clip.stat().st_size > 0
    assert not [p for p in _files_under(tmp_path) - before if clip.parent not in p.parents and p != clip.parent]

    unfinished = tmp_path / "runs" / "unfinished"
    code, err = run_cli(["run", str(portrait_file), "--out", str(unfinished), *FAKES, "--stop-after", "fit"], capsys)
    assert code == 0, err
    code, err = run_cli(["render", str(unfinished), "--views", "turntable", "--out", str(clip)], capsys)
    assert code == 2 and "run directory without a final avatar" in err and str(unfinished) in err
    assert "fit/avatar.ckpt" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- faces (real)


def _jt(shared: Path):
    from PIL import Image

    return Image.open(shared / "portraits" / "Justin_Timberlake_crop.png").convert("RGB")


def face_filling_the_frame(shared: Path, tmp: Path) -> Path:
    """A crop inside the face (eyes to chin): at the tiny profile the eyes cover no pixel of some frames."""
    path = tmp / "fill.png"
    _jt(shared).crop((110, 150, 400, 440)).save(path)
    return path


def two_faces(shared: Path, tmp: Path) -> Path:
    from PIL import Image

    both = Image.new("RGB", (1024, 512))
    both.paste(_jt(shared), (0, 0))
    both.paste(Image.open(shared / "portraits" / "Adele_crop.png").convert("RGB").resize((400, 400)), (562, 56))
    path = tmp / "two.png"
    both.save(path)
    return path


def turned_90(shared: Path, tmp: Path) -> Path:
    path = tmp / "turned.png"
    _jt(shared).rotate(90, expand=True).save(path)
    return path


def small_face(shared: Path, tmp: Path) -> Path:
    """A face about 40 pixels wide in a 1600x1200 photo."""
    from PIL import Image

    photo = Image.new("RGB", (1600, 1200), (90, 110, 130))
    photo.paste(_jt(shared).resize((80, 80)), (700, 500))
    path = tmp / "small_face.png"
    photo.save(path)
    return path


def grey_portrait(shared: Path, tmp: Path) -> Path:
    path = tmp / "grey_man.png"
    _jt(shared).convert("L").save(path)
    return path


FACES = [
    ("face filling the frame", face_filling_the_frame, ()),
    ("two faces side by side", two_faces, ("more than one face", "largest")),
    ("portrait turned 90 degrees", turned_90, ("turned 90 degrees clockwise",)),
    ("face of 40 pixels in a large photo", small_face, ()),
    ("greyscale portrait", grey_portrait, ()),
]


@pytest.fixture
def real_pipeline(monkeypatch, tmp_path):
    from ophav_core import plugins

    monkeypatch.delenv("OPHAV_TEST_FAKES", raising=False)
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.chdir(tmp_path)
    plugins.reset_host()
    yield
    plugins.reset_host()


def test_a_landscape_without_a_face(real_pipeline, tmp_path, capsys):
    source = landscape_without_face(tmp_path)
    out = tmp_path / "out"
    before = _files_under(tmp_path)
    code, err = run_cli(["run", str(source), "--out", str(out), "--profile", "tiny", "--device", "cpu", "-q",
                         "--stop-after", "portrait"], capsys)
    check_one_line(code, err, source, Case("landscape", landscape_without_face, "run", 1, ("no face found",)))
    assert not [p for p in _files_under(tmp_path) - before if out not in p.parents and p != out]


@pytest.mark.parametrize("name, make, warns", FACES, ids=[f[0] for f in FACES])
def test_unusual_portraits_run_past_image2video(name, make, warns, shared_data, real_pipeline, tmp_path, capsys):
    source = make(shared_data, tmp_path)
    out = tmp_path / "out"
    before = _files_under(tmp_path)
    code, err = run_cli(["run", str(source), "--out", str(out), "--profile", "tiny", "--device", "cpu", "-q",
                         "--stop-after", "image2video"], capsys)
    assert code == 0, f"{name}: {err}"
    assert "Traceback" not in err and "error:" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    for phrase in warns:
        assert any(phrase in w and str(source) in w for w in warnings), f"{name}: no warning with {phrase!r}: {err}"
    if name.startswith("portrait turned"):
        from ophav_core.stages import FrameSet

        assert _portrait_written(out).shape[:2] == (512, 512)
        assert FrameSet.load(out / "image2video" / "frames.npz").frames.shape[0] > 0
    assert not [p for p in _files_under(tmp_path) - before if out not in p.parents and p != out]
