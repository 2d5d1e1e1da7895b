import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ophav_core.cli import app, main


def run_main(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


FAKES = ["--image2video", "fake", "--segmenter", "fake", "--tracker", "fake", "--field", "fake",
         "--restorer", "fake", "--profile", "tiny", "--device", "cpu", "-q"]


def test_run_end_to_end_with_fakes(fakes_env, portrait_file, tmp_path, capsys):
    code, out, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES, "--rounds", "1"], capsys)
    assert code == 0, err
    assert (tmp_path / "r/avatar/avatar.ckpt").is_file()


def test_run_reuses_the_steps_of_another_run(fakes_env, portrait_file, tmp_path, capsys):
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r1"), *FAKES, "--rounds", "1"], capsys)
    assert code == 0, err
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r2"), *FAKES, "--rounds", "2",
                             "--reuse", str(tmp_path / "r1")], capsys)
    assert code == 0, err
    assert "took portrait, image2video, track, segment, fit, render1, restore1, refit1 from another run" in err
    assert fakes_env.CALLS["fit0"] == 1 and fakes_env.CALLS["refit"] == 2
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r4"), *FAKES, "--set", "seed=5",
                             "--reuse", str(tmp_path / "r1")], capsys)
    assert code == 0 and "no step of" in err
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r3"), *FAKES,
                             "--reuse", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a run directory" in err and not (tmp_path / "r3").exists()


@pytest.mark.parametrize("extra, message", [
    (["--restorer", "fak"], "Did you mean 'fake'"),
    (["--set", "restorer.gain=1000"], "less than or equal to 50"),
    (["--set", "restorer.nope=1"], "Extra inputs are not permitted"),
    (["--profile", "huge"], "unknown profile"),
])
def test_config_errors_exit_2_with_one_line(fakes_env, portrait_file, tmp_path, capsys, extra, message):
    code, out, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES, *extra], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if not line.startswith("warning:")]) == 1
    assert not (tmp_path / "r").exists()  # nothing started


def test_missing_or_non_image_portrait_exit_2(fakes_env, tmp_path, capsys):
    code, _, err = run_main(["run", str(tmp_path / "nope.jpg"), *FAKES], capsys)
    assert code == 2 and "does not exist" in err
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    code, _, err = run_main(["run", str(text), *FAKES], capsys)
    assert code == 2 and "not an image" in err


def test_no_face_in_portrait_exit_1_naming_the_file(fakes_env, tmp_path, capsys):
    import numpy as np

    from ophav_core.media import save_png

    blank = tmp_path / "blank.png"
    save_png(blank, np.full((64, 64, 3), 128, np.uint8))
    code, _, err = run_main(["run", str(blank), "--out", str(tmp_path / "r"), *FAKES], capsys)
    assert code == 1 and "no face" in err and "blank.png" in err


def test_runtime_failure_exit_1_and_resume(fakes_env, portrait_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "segment")
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES], capsys)
    assert code == 1 and "simulated crash at segment" in err and "Traceback" not in err
    monkeypatch.delenv("OPHAV_FAKE_CRASH")
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES, "--resume"], capsys)
    assert code == 0, err


def test_plugins_json_lists_components_by_stage(fakes_env, capsys):
    code, out, _ = run_main(["plugins", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    stages = {(c["stage"], c["name"]) for c in data["components"]}
    for stage in ("image2video", "segmenter", "tracker", "field", "restorer"):
        assert (stage, "fake") in stages
    assert all({"package", "version", "ready", "missing_requirements", "weights"} <= set(c) for c in data["components"])


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "plugins", "preprocess", "fit", "render", "weights", "eval", "ablate"):
        assert command in result.output


def test_import_ophav_core_imports_no_plugin_and_no_torch():
    code = ("import sys, ophav_core, ophav_core.cli, ophav_core.config, ophav_core.pipeline.scheduler, ophav_core.stages, "
            "ophav_core.api, ophav_core.study.metrics, ophav_core.study.evaluation, ophav_core.testing.contracts; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'mediapipe', 'cv2', 'av', 'ophav_insta', "
            "'ophav_mediapipe', 'ophav_meshwarp', 'ophav_reference', 'ophav_facerestore', 'ophav_talkinghead', "
            "'ophav_matting', 'ophav_metrics', 'gfpgan', 'basicsr', 'dlib', 'skimage')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_full_disk_is_a_clear_error_and_keeps_finished_steps(fakes_env, portrait_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "segment:disk-full")
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES], capsys)
    assert code == 1 and "disk is full" in err and "--resume" in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "r/manifest.json").read_text())
    assert manifest["steps"]["track"]["status"] == "done" and manifest["steps"]["segment"]["status"] != "done"
    monkeypatch.delenv("OPHAV_FAKE_CRASH")
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES, "--resume"], capsys)
    assert code == 0, err
    assert fakes_env.CALLS["image2video"] == 1


def test_gpu_out_of_memory_gives_advice(fakes_env, portrait_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPHAV_FAKE_CRASH", "fit0:out-of-memory")
    code, _, err = run_main(["run", str(portrait_file), "--out", str(tmp_path / "r"), *FAKES], capsys)
    assert code == 1 and "ran out of memory" in err and "batch_rays" in err and "Traceback" not in err


def test_warnings_are_one_line_for_a_person(monkeypatch, capsys):
    import warnings

    from ophav_core.cli import root as cli

    def warn(**_kwargs):
        warnings.warn("the renders: no face in 1 of 30 frames", UserWarning)
        return 0

    monkeypatch.setattr(cli, "app", warn)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run_main(["run"], capsys)
    assert code == 0
    assert err.strip() == "warning: the renders: no face in 1 of 30 frames"
