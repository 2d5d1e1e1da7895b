"""The reference docs are generated from the code; this fails when someone changed the code but not the docs."""
from pathlib import Path

import pytest

from ophav_core.cli import docgen

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", sorted(docgen.GENERATED))
def test_generated_docs_are_up_to_date(name, monkeypatch):
    monkeypatch.delenv("OPHAV_DISABLE_PLUGINS", raising=False)
    expected = docgen.GENERATED[name]()
    assert (DOCS / name).read_text() == expected, f"docs/{name} is stale: run `python -m ophav_core.cli.docgen docs`"


def test_every_stage_has_a_component_in_the_config_docs():
    text = (DOCS / "config.md").read_text()
    for stage in ("image2video", "segmenter", "tracker", "field", "restorer"):
        assert f"### {stage} `" in text
