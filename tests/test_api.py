"""The library API (ophav_core.api), as the README shows it: run, render and evaluate from Python."""
import pytest

from ophav_core.errors import UsageError

FAKE = {stage: "fake" for stage in ("image2video", "segmenter", "tracker", "field", "restorer")}


def test_run_render_evaluate_from_python(fakes_env, portrait_file, tmp_path):
    import ophav_core
    from ophav_core import evaluate, render, run

    assert ophav_core.run is run  # the package exposes the API lazily
    lines = []
    result = run(portrait_file, tmp_path / "me", rounds=1, profile="tiny", log=lines.append, **FAKE)
    assert result.stopped_after is None and result.avatar.is_file()
    assert any("[run ] fit" in line for line in lines)
    turn = render(tmp_path / "me", views="turntable", seconds=1.0, fps=5, size=24)  # a run directory works too
    assert turn.rgb.shape == (5, 24, 24, 3) and turn.alpha.shape == (5, 24, 24) and turn.fps == 5
    table = evaluate([result.avatar], out=tmp_path / "eval", dataset=tmp_path / "me", metrics="psnr,ssim",
                     quiet=True)
    assert "PSNR" in table and (tmp_path / "eval" / "metrics.json").is_file()


def test_render_names_what_it_needs(fakes_env, tmp_path):
    from ophav_core import api

    with pytest.raises(UsageError, match="does not exist"):
        api.render(tmp_path / "nowhere.ckpt", views="turntable")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="run directory without a final avatar"):
        api.resolve_avatar(tmp_path / "run")
