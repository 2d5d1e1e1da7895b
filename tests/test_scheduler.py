import json
from pathlib import Path

import pytest

from ophav_core.config import build_config, resolve
from ophav_core.plugins import build_host
from ophav_core.pipeline.scheduler import Scheduler
from ophav_core.testing import fakes
from ophav_core.testing.fakes import FAKE_CONFIG, FakePlugin
from ophav_core.weights import sha256_of


def make_scheduler(run_dir, portrait, rounds, resume=False, stop_after=None, sets=(), reuse=()):
    registry = build_host(extra_plugins=[("fakes", FakePlugin())], load_entry_points=False).registry
    flags = {k: v["name"] for k, v in FAKE_CONFIG.items()}
    flags.update(profile="tiny", rounds=rounds, device="cpu")
    return Scheduler(run_dir, resolve(build_config(None, flags, list(sets)), registry), portrait, resume=resume,
                     stop_after=stop_after, quiet=True, reuse=reuse)


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("OPHAV_FAKE_CRASH", raising=False)
    fakes.CALLS.clear()


@pytest.mark.parametrize("rounds", [0, 1, 2])
def test_full_run_writes_every_artifact(tmp_path, portrait_file, rounds):
    result = make_scheduler(tmp_path / "run", portrait_file, rounds).run()
    root = tmp_path / "run"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "done"
    expected = ["portrait", "image2video", "track", "segment", "fit"]
    for r in range(1, rounds + 1):
        expected += [f"render{r}", f"restore{r}", f"refit{r}"]
    expected.append("export")
    assert list(manifest["steps"]) == expected
    assert all(step["status"] == "done" for step in manifest["steps"].values())
    assert fakes.CALLS["refit"] == rounds and fakes.CALLS["fit0"] == 1
    for rel in ["avatar/avatar.ckpt", "avatar/avatar.json", "preview.mp4", "report.html", "config.json",
                "image2video/video.mp4", "track/pose.png", "segment/overlay.png"]:
        assert (root / rel).is_file(), rel
    for r in range(1, rounds + 1):
        assert (root / f"round{r}/contact.png").is_file()
    assert result.avatar == root / "avatar/avatar.ckpt"
    assert manifest["components"]["restorer"] == {"name": "fake", "package": "ophav-test-fakes", "version": "0"}


def test_resume_after_crash_mid_round_recomputes_nothing_and_matches(tmp_path, portrait_file, monkeypatch):
    clean_run = make_scheduler(tmp_path / "clean", portrait_file, 2).run()
    reference = sha256_of(clean_run.avatar)
    fakes.CALLS.clear()

    monkeypatch.setenv("OPHAV_FAKE_CRASH", "restore2")
    with pytest.raises(fakes.CrashForTest):
        make_scheduler(tmp_path / "run", portrait_file, 2).run()
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"]["restore2"]["status"] == "failed"
    assert manifest["steps"]["refit1"]["status"] == "done"
    before = dict(fakes.CALLS)

    monkeypatch.delenv("OPHAV_FAKE_CRASH")
    fakes.CALLS["restore"] = 1  # the fake numbers its calls; the process of the crashed run ended here
    result = make_scheduler(tmp_path / "run", portrait_file, 2, resume=True).run()
    assert fakes.CALLS["image2video"] == before["image2video"] == 1
    assert fakes.CALLS["fit0"] == 1 and fakes.CALLS["refit"] == 2  # refit1 from the first attempt, refit2 now
    assert fakes.CALLS["track"] == before["track"]
    assert sha256_of(result.avatar) == reference


def test_a_damaged_artifact_is_recomputed(tmp_path, portrait_file):
    make_scheduler(tmp_path / "run", portrait_file, 1).run()
    (tmp_path / "run/segment/masks.npz").write_bytes(b"truncated")
    fakes.CALLS.clear()
    make_scheduler(tmp_path / "run", portrait_file, 1, resume=True).run()
    assert fakes.CALLS["segment"] == 1 and fakes.CALLS["image2video"] == 0


def test_existing_run_needs_resume_and_same_config(tmp_path, portrait_file):
    from ophav_core.errors import UsageError

    make_scheduler(tmp_path / "run", portrait_file, 0, stop_after="track").run()
    with pytest.raises(UsageError, match="--resume"):
        make_scheduler(tmp_path / "run", portrait_file, 0).run()
    with pytest.raises(UsageError, match="another configuration"):
        make_scheduler(tmp_path / "run", portrait_file, 0, resume=True, sets=["restorer.gain=4"]).run()


def test_stop_after_then_resume(tmp_path, portrait_file):
    result = make_scheduler(tmp_path / "run", portrait_file, 1, stop_after="image2video").run()
    assert result.stopped_after == "image2video" and result.avatar is None
    assert json.loads((tmp_path / "run/manifest.json").read_text())["status"] == "stopped"
    assert fakes.CALLS["fit0"] == 0
    make_scheduler(tmp_path / "run", portrait_file, 1, resume=True).run()
    assert fakes.CALLS["image2video"] == 1 and fakes.CALLS["fit0"] == 1


def make_reusing(run_dir, portrait, rounds, reuse, sets=()):
    return make_scheduler(run_dir, portrait, rounds, sets=sets, reuse=reuse)


def test_a_run_takes_the_steps_it_shares_with_another_and_matches_a_fresh_run(tmp_path, portrait_file):
    import os

    make_scheduler(tmp_path / "two_rounds_fresh", portrait_file, 2).run()
    fresh = sha256_of(tmp_path / "two_rounds_fresh/avatar/avatar.ckpt")
    make_scheduler(tmp_path / "one_round", portrait_file, 1).run()
    fakes.CALLS.clear()
    scheduler = make_reusing(tmp_path / "two_rounds", portrait_file, 2, [tmp_path / "one_round"])
    result = scheduler.run()
    # Everything up to refit1 came from the one-round run; round 2 and the export were computed.
    assert fakes.CALLS["image2video"] == 0 and fakes.CALLS["fit0"] == 0 and fakes.CALLS["track"] == 0
    assert fakes.CALLS["refit"] == 1 and fakes.CALLS["restore"] == 1
    assert sha256_of(result.avatar) == fresh
    assert list(scheduler.reused) == ["portrait", "image2video", "track", "segment", "fit", "render1", "restore1",
                                      "refit1"]
    steps = json.loads((tmp_path / "two_rounds/manifest.json").read_text())["steps"]
    assert steps["fit"]["reused"]["from"] == str((tmp_path / "one_round").resolve())
    assert "reused" not in steps["refit2"] and steps["refit2"]["key"] != steps["refit1"]["key"]
    ours, theirs = tmp_path / "two_rounds/fit/avatar.ckpt", tmp_path / "one_round/fit/avatar.ckpt"
    assert os.stat(ours).st_ino == os.stat(theirs).st_ino  # a hard link, not a copy
    assert (tmp_path / "two_rounds/round1/contact.png").is_file() and (tmp_path / "two_rounds/track/pose.png").is_file()
    assert "taken from <code>" in (tmp_path / "two_rounds/report.html").read_text()

    # A resumed run keeps what it took, and the run it took it from can go away.
    import shutil

    shutil.rmtree(tmp_path / "one_round")
    fakes.CALLS.clear()
    make_scheduler(tmp_path / "two_rounds", portrait_file, 2, resume=True).run()
    assert sum(fakes.CALLS.values()) == 0


def test_reuse_stops_where_the_computation_differs(tmp_path, portrait_file):
    make_scheduler(tmp_path / "base", portrait_file, 1).run()
    fakes.CALLS.clear()
    other_restorer = make_reusing(tmp_path / "gain", portrait_file, 1, [tmp_path / "base"], sets=["restorer.gain=20"])
    other_restorer.run()
    assert "render1" in other_restorer.reused and "restore1" not in other_restorer.reused
    assert fakes.CALLS["restore"] == 1 and fakes.CALLS["refit"] == 1 and fakes.CALLS["fit0"] == 0

    fakes.CALLS.clear()
    other_seed = make_reusing(tmp_path / "seed", portrait_file, 1, [tmp_path / "base"], sets=["seed=3"])
    other_seed.run()
    assert other_seed.reused == {} and fakes.CALLS["image2video"] == 1


def test_a_damaged_file_in_the_other_run_is_not_taken(tmp_path, portrait_file):
    make_scheduler(tmp_path / "base", portrait_file, 0).run()
    (tmp_path / "base/fit/avatar.ckpt").write_bytes(b"truncated")
    fakes.CALLS.clear()
    scheduler = make_reusing(tmp_path / "again", portrait_file, 1, [tmp_path / "base"])
    scheduler.run()
    assert "segment" in scheduler.reused and "fit" not in scheduler.reused
    # The segment step was taken: the only segmentations are of the round's kept renders, one each, which the
    # refit cuts to the head.
    kept = sum(json.loads((tmp_path / "again/round1/checks.json").read_text())["kept"])
    assert fakes.CALLS["fit0"] == 1 and fakes.CALLS["segment"] == kept


def test_the_built_in_script_is_part_of_the_coarse_videos_key(monkeypatch):
    """A run made with an older built-in script is not resumed or reused as one made with the current script."""
    from ophav_core.config import RunConfig, resolve
    from ophav_core.pipeline.scheduler import step_keys
    from ophav_core.plugins import get_host
    from ophav_core.stages import motion

    resolved = resolve(RunConfig(), get_host().registry)
    portrait = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    before = step_keys(resolved, portrait, "cpu")
    assert step_keys(resolved, portrait, "cpu") == before
    older = motion.default_script()
    older["keyframes"] = [dict(k, yaw=40) if k.get("yaw") == 52 else k for k in older["keyframes"]]
    monkeypatch.setattr(motion, "default_script", lambda: older)
    after = step_keys(resolved, portrait, "cpu")
    assert after["portrait"] == before["portrait"] and after["image2video"] != before["image2video"]


def test_worker_counts_do_not_change_what_a_step_computes():
    """Options declared as not affecting the result (worker counts) are left out of the step keys, so changing
    them reuses every finished step up to the export; any other option change makes a new key."""
    from ophav_core.config import RunConfig, resolve
    from ophav_core.pipeline.scheduler import step_keys
    from ophav_core.plugins import get_host

    portrait = Path(__file__).resolve().parents[1] / "examples" / "astronaut.jpg"
    registry = get_host().registry

    def keys(**options):  # the export's key holds the whole config it writes into the avatar's description
        keys = step_keys(resolve(RunConfig(**options), registry), portrait, "cpu")
        return {step: key for step, key in keys.items() if step != "export"}

    base = keys()
    assert keys(image2video={"name": "meshwarp", "options": {"workers": 3}}) == base
    assert keys(restorer={"name": "reference", "options": {"workers": 2}}) == base
    changed = keys(image2video={"name": "meshwarp", "options": {"crop_scale": 2.0}})
    assert changed["portrait"] == base["portrait"] and changed["image2video"] != base["image2video"]


def test_mirrored_frames_change_the_fits_key_and_nothing_before_it(tmp_path, portrait_file):
    make_scheduler(tmp_path / "base", portrait_file, 0).run()
    fakes.CALLS.clear()
    mirrored = make_reusing(tmp_path / "mirror", portrait_file, 0, [tmp_path / "base"], sets=["mirror_frames=true"])
    mirrored.run()
    assert "segment" in mirrored.reused and "fit" not in mirrored.reused and fakes.CALLS["fit0"] == 1
    fakes.CALLS.clear()
    # Off is the default, and a run that says so takes the fit of a run made before the option existed.
    plain = make_reusing(tmp_path / "plain", portrait_file, 0, [tmp_path / "base"], sets=["mirror_frames=false"])
    plain.run()
    assert "fit" in plain.reused and fakes.CALLS["fit0"] == 0
