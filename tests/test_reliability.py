"""A run killed at any moment resumes and ends with the result an uninterrupted run gives."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ophav_core.weights import sha256_of

FAKES = ["--image2video", "fake", "--segmenter", "fake", "--tracker", "fake", "--field", "fake",
         "--restorer", "fake", "--profile", "tiny", "--device", "cpu", "-q", "--rounds", "2"]


def ophav(args, env, **kw):
    return subprocess.Popen([sys.executable, "-c", "from ophav_core.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, OPHAV_TEST_FAKES="1", OPHAV_WEIGHTS=str(tmp_path / "w"))
    e.pop("OPHAV_FAKE_CRASH", None)
    return e


@pytest.mark.slow
def test_killed_at_random_points_resumes_to_the_same_result(tmp_path, portrait_file, env):
    clean = ophav(["run", str(portrait_file), "--out", str(tmp_path / "clean"), *FAKES], env)
    out, err = clean.communicate(timeout=120)
    assert clean.returncode == 0, err
    reference = sha256_of(tmp_path / "clean/avatar/avatar.ckpt")
    start = time.perf_counter()
    clean_seconds = json.loads((tmp_path / "clean/manifest.json").read_text())["timings"]
    total = sum(clean_seconds.values()) + 1.0  # + interpreter start-up
    rng = np.random.default_rng(7)
    for trial, delay in enumerate(rng.uniform(0.3, total + 0.5, size=3)):
        run_dir = tmp_path / f"killed{trial}"
        proc = ophav(["run", str(portrait_file), "--out", str(run_dir), *FAKES], env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        args = ["run", str(portrait_file), "--out", str(run_dir), *FAKES]
        if (run_dir / "manifest.json").exists():
            args.append("--resume")
        resumed = ophav(args, env)
        _, err = resumed.communicate(timeout=120)
        assert resumed.returncode == 0, f"trial {trial} (killed after {delay:.2f}s): {err}"
        assert sha256_of(run_dir / "avatar/avatar.ckpt") == reference, f"trial {trial}: a different avatar"
        leftovers = [p for p in run_dir.rglob("*.tmp")]
        assert not leftovers, leftovers
    assert time.perf_counter() - start < 120


def test_unwritable_output_directory_is_a_clear_error(tmp_path, portrait_file, env):
    if os.geteuid() == 0:
        target = "/proc/ophav-run"  # root may write anywhere else
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "run")
    proc = ophav(["run", str(portrait_file), "--out", target, *FAKES], env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "cannot write" in err and "Traceback" not in err


def test_render_command_from_checkpoint_alone(tmp_path, portrait_file, env):
    proc = ophav(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES], env)
    assert proc.wait(timeout=120) == 0
    ckpt = tmp_path / "r/avatar/avatar.ckpt"
    script = tmp_path / "m.yaml"
    script.write_text("keyframes: [{t: 0, yaw: -20}, {t: 1, yaw: 20, smile: 1}]\n")
    for extra in (["--views", "turntable"], ["--script", str(script)], ["--driver", str(tmp_path / "r/image2video/video.mp4"), "--side-by-side"]):
        out = tmp_path / f"{extra[0][2:]}.mp4"
        proc = ophav(["render", str(ckpt), *extra, "--out", str(out), "--frames", str(tmp_path / extra[0][2:]),
                      "--size", "48", "--seconds", "0.4", "-q"], env)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.stat().st_size > 0
        pngs = sorted((tmp_path / extra[0][2:]).glob("*.png"))
        assert pngs, extra
        from ophav_core.media import read_image

        width = read_image(pngs[0]).image.shape[1]
        assert width == (96 if extra[0] == "--driver" else 48)
    proc = ophav(["render", str(ckpt), "--out", str(tmp_path / "x.mp4")], env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "exactly one of" in err
