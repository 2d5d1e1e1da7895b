import pytest

from ophav_core.config import build_config, resolve
from ophav_core.errors import ComponentNotFound, UsageError
from ophav_core.plugins import build_host
from ophav_core.testing.fakes import FAKE_CONFIG, FakePlugin


@pytest.fixture
def registry():
    return build_host(extra_plugins=[("fakes", FakePlugin())], load_entry_points=False).registry


def test_sources_merge_in_order(tmp_path, registry):
    path = tmp_path / "c.yaml"
    path.write_text("profile: tiny\nrounds: 1\nrestorer: {name: fake, options: {gain: 3}}\n"
                    "image2video: fake\nsegmenter: fake\ntracker: fake\nfield: fake\n")
    cfg = build_config(path, {"rounds": 2}, ["restorer.gain=7", "seed=5"])
    assert cfg.rounds == 2 and cfg.seed == 5 and cfg.restorer.options == {"gain": 7}
    resolved = resolve(cfg, registry)
    assert resolved.stages["restorer"].options.gain == 7
    assert resolved.to_dict()["restorer"]["package"] == "ophav-test-fakes"


def test_switching_component_drops_options_of_the_old_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("restorer: {name: fake, options: {gain: 3}}\n")
    cfg = build_config(path, {"restorer": "other"})
    assert cfg.restorer.name == "other" and cfg.restorer.options == {}


def test_unknown_component_and_bad_option_fail_before_work(registry):
    cfg = build_config(None, {**{k: v["name"] for k, v in FAKE_CONFIG.items()}, "restorer": "fak"})
    with pytest.raises(ComponentNotFound, match="Did you mean 'fake'"):
        resolve(cfg, registry)
    cfg = build_config(None, {k: v["name"] for k, v in FAKE_CONFIG.items()}, ["restorer.gain=99"])
    with pytest.raises(UsageError, match="restorer 'fake' options: gain: Input should be less than or equal to 50"):
        resolve(cfg, registry)
    cfg = build_config(None, {k: v["name"] for k, v in FAKE_CONFIG.items()}, ["restorer.gian=1"])
    with pytest.raises(UsageError, match="gian: Extra inputs are not permitted"):
        resolve(cfg, registry)


def test_bad_set_syntax_and_top_level_fields():
    with pytest.raises(UsageError, match="KEY=VALUE"):
        build_config(None, {}, ["rounds"])
    with pytest.raises(UsageError, match="rounds"):
        build_config(None, {}, ["rounds=-1"])
    with pytest.raises(UsageError, match="colour"):
        build_config(None, {}, ["colour=1"])


def test_fingerprint_tracks_options(registry):
    base = {k: v["name"] for k, v in FAKE_CONFIG.items()}
    a = resolve(build_config(None, base, ["restorer.gain=2"]), registry).fingerprint()
    b = resolve(build_config(None, base, ["restorer.gain=3"]), registry).fingerprint()
    c = resolve(build_config(None, base, ["restorer.gain=2"]), registry).fingerprint()
    assert a != b and a == c
