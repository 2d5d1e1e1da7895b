
import numpy as np
import pytest

from ophav_core.media import io as media
from ophav_core.errors import UsageError
from ophav_core.testing.synthetic import render_synthetic, synthetic_tracking


@pytest.mark.parametrize("backend", ["av", "cv2"])
def test_video_roundtrip(tmp_path, backend, monkeypatch):
    frames, _ = render_synthetic(synthetic_tracking(5, 64))
    path = tmp_path / "v.mp4"
    if backend == "cv2":
        media._write_video_cv2(path, frames.frames, 10)
        back, fps = media._read_video_cv2(path, None)
        back = np.stack(back)
    else:
        media.write_video(path, frames.frames, 10)
        loaded = media.read_video(path)
        back, fps = loaded.frames, loaded.fps
    assert back.shape == frames.frames.shape and fps == pytest.approx(10)
    assert np.abs(back.astype(int) - frames.frames).mean() < 12  # lossy, but the same pictures


def test_read_image_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        media.read_image(tmp_path / "none.png")
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="folder"):
        media.read_image(tmp_path / "d")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(UsageError, match="not an image"):
        media.read_image(bad)


def test_image_folder_as_video(tmp_path):
    frames, _ = render_synthetic(synthetic_tracking(3, 32))
    for i, f in enumerate(frames.frames):
        media.save_png(tmp_path / f"{i:03d}.png", f)
    loaded = media.read_video(tmp_path, size=16)
    assert loaded.frames.shape == (3, 16, 16, 3)


def test_contact_sheet_layout():
    images = [np.full((10, 10, 3), i * 20, np.uint8) for i in range(5)]
    sheet = media.contact_sheet(images, columns=3)
    assert sheet.shape == (20, 30, 3)
    assert (sheet[0, 0] == 0).all() and (sheet[10, 10] == 80).all()
