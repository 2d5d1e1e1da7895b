from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (the shared test data lives beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def fakes_env(monkeypatch, tmp_path):
    """Run the CLI with the fake components, an empty weight store and reset call counters."""
    from ophav_core import plugins
    from ophav_core.testing import fakes

    monkeypatch.setenv("OPHAV_TEST_FAKES", "1")
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("OPHAV_FAKE_CRASH", raising=False)
    plugins.reset_host()
    fakes.CALLS.clear()
    yield fakes
    plugins.reset_host()


@pytest.fixture
def portrait_file(tmp_path) -> Path:
    from ophav_core.media import save_png
    from ophav_core.testing.synthetic import synthetic_portrait

    path = tmp_path / "portrait.png"
    save_png(path, synthetic_portrait(64).image)
    return path
