import sys
import textwrap
from importlib import metadata

import pytest

from ophav_core.errors import ComponentNotFound, DuplicateComponent
from ophav_core.plugins import build_host
from ophav_core.registry import ComponentSpec, Registry


def make_dist(root, dist, module, body, entry_name=None, version="1.2.3"):
    """An installed distribution on sys.path (a .dist-info with an `ophav` entry point) and its module."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[ophav]\n{entry_name or dist} = {module}\n")


RESTORER_PLUGIN = """
    import numpy as np
    from pydantic import BaseModel, ConfigDict
    from ophav_core import hookimpl
    from ophav_core.registry import ComponentSpec
    from ophav_core.stages import Restorer

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        amount: int = 3

    class Brighten(Restorer):
        Options = Options
        def restore(self, batch):
            return np.clip(batch.images.astype(int) + self.options.amount, 0, 255).astype(np.uint8)

    @hookimpl
    def register_restorer(register):
        register(ComponentSpec(stage="restorer", name="{name}", factory=Brighten, options=Options))
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("OPHAV_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("OPHAV_STRICT_PLUGINS", raising=False)
    yield tmp_path
    for name in list(sys.modules):
        if name.startswith("tp_"):
            del sys.modules[name]


def test_third_party_restorer_is_registered_with_its_package(site):
    make_dist(site, "my-restorer", "tp_mine", RESTORER_PLUGIN.replace("{name}", "brighten"))
    host = build_host()
    spec = host.registry.get("restorer", "brighten")
    assert (spec.package, spec.version, spec.plugin) == ("my-restorer", "1.2.3", "my-restorer")
    from ophav_core.testing import contracts

    out = contracts.check_restorer(spec.create({"amount": 5}, contracts.tiny_context()))
    assert out.dtype.name == "uint8"


def test_broken_plugin_is_recorded_not_fatal(site, monkeypatch):
    make_dist(site, "broken-plugin", "tp_broken", "raise RuntimeError('boom at import')\n")
    make_dist(site, "good-plugin", "tp_good", RESTORER_PLUGIN.replace("{name}", "good"))
    host = build_host()
    failures = {p.name: p.error for p in host.failures}
    assert "broken-plugin" in failures and "boom at import" in failures["broken-plugin"]
    assert host.registry.get("restorer", "good").package == "good-plugin"
    monkeypatch.setenv("OPHAV_STRICT_PLUGINS", "1")
    with pytest.raises(RuntimeError, match="boom at import"):
        build_host()


def test_disable_plugins_by_name(site, monkeypatch):
    make_dist(site, "good-plugin", "tp_good2", RESTORER_PLUGIN.replace("{name}", "good2"))
    monkeypatch.setenv("OPHAV_DISABLE_PLUGINS", "good-plugin,other")
    host = build_host()
    assert "good2" not in host.registry.names("restorer")


def test_same_name_from_two_packages_is_an_error_naming_both(site):
    make_dist(site, "pkg-one", "tp_one", RESTORER_PLUGIN.replace("{name}", "clash"))
    make_dist(site, "pkg-two", "tp_two", RESTORER_PLUGIN.replace("{name}", "clash"))
    with pytest.raises(DuplicateComponent) as info:
        build_host()
    assert "pkg-one" in str(info.value) and "pkg-two" in str(info.value)


def test_unknown_name_suggests_and_lists():
    registry = Registry()
    registry.add(ComponentSpec("restorer", "gfpgan", object, package="a"))
    registry.add(ComponentSpec("restorer", "codeformer", object, package="a"))
    with pytest.raises(ComponentNotFound) as info:
        registry.get("restorer", "gfpgn")
    assert "Did you mean 'gfpgan'" in str(info.value) and "codeformer" in str(info.value)


def test_our_plugins_come_from_the_entry_point_group():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="ophav")}
    assert eps.get("mediapipe") == "ophav_mediapipe.plugin"
    assert eps.get("insta") == "ophav_insta.plugin"


def test_loading_every_shipped_plugin_imports_no_heavy_module():
    import subprocess

    code = ("import sys\nfrom ophav_core.plugins import build_host\nh = build_host()\n"
            "assert not h.failures, [(p.name, p.error) for p in h.failures]\n"
            "heavy = {'torch', 'cv2', 'mediapipe', 'av', 'matplotlib', 'scipy', 'gfpgan', 'basicsr', 'ray', 'lpips'}\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & heavy)\nassert not bad, bad\n"
            "assert len(list(h.registry)) >= 12\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
