"""The third-party example package installs from its folder into a fresh environment, appears in `ophav
plugins`, runs in `ophav run --restorer unsharp` and in an ablation grid, and passes its own tests there."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ophav_core.media import save_png
from ophav_core.testing.synthetic import synthetic_portrait

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ophav-plugin-example"
OPHAV = "from ophav_core.cli import main; main()"


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """A new virtual environment that sees this one's packages (ophav, numpy...) but not its own installs."""
    root = tmp_path_factory.mktemp("fresh")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The base environment as a site directory underneath (its .pth files, e.g. ophav's editable install, run).
    Path(purelib, "_base_env.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    source = root / "ophav-plugin-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "-q", str(source)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    assert any(p.name.startswith("ophav_plugin_example-0.1.0") for p in Path(purelib).iterdir())
    return python, source, root


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPHAV_")}
    env.update(OPHAV_TEST_FAKES="1", OPHAV_WEIGHTS=str(root / "weights"))
    return env


def _ophav(python: Path, root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", OPHAV, *args], capture_output=True, text=True, env=_env(root),
                          cwd=root, timeout=120)


FAKES = ["--image2video", "fake", "--segmenter", "fake", "--tracker", "fake", "--field", "fake", "--profile",
         "tiny", "--device", "cpu", "-q"]


@pytest.mark.slow
def test_installed_plugin_appears_and_runs(fresh_env):
    python, _, root = fresh_env
    listing = _ophav(python, root, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {(c["stage"], c["name"]): c for c in json.loads(listing.stdout)["components"]}
    unsharp = rows[("restorer", "unsharp")]
    assert unsharp["package"] == "ophav-plugin-example" and unsharp["version"] == "0.1.0" and unsharp["ready"]
    metric = rows[("metric", "head_gradient")]  # its metric is listed beside the shipped ones
    assert metric["package"] == "ophav-plugin-example" and metric["ready"] and ("metric", "identity") in rows

    save_png(root / "portrait.png", synthetic_portrait(64).image)
    run = _ophav(python, root, "run", "portrait.png", "--out", "run", *FAKES, "--restorer", "unsharp", "--rounds",
                 "1", "--set", "restorer.amount=1.5")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((root / "run/manifest.json").read_text())
    assert manifest["components"]["restorer"] == {"name": "unsharp", "package": "ophav-plugin-example",
                                                  "version": "0.1.0"}
    assert manifest["steps"]["restore1"]["status"] == "done"
    assert manifest["config"]["restorer"]["options"] == {"amount": 1.5, "radius": 1.5}

    evaluated = _ophav(python, root, "eval", "run", "--dataset", "run", "--metrics", "psnr,head_gradient", "--out",
                       "ev", "-q")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "| Method | PSNR↑ | grad↑ |" in evaluated.stdout
    row = json.loads((root / "ev/metrics.json").read_text())["results"][0]
    # A number (the fake field renders flat colours: 0), computed by the third party's package.
    assert row["metrics"]["head_gradient"] is not None and row["settings"]["metric_plugins"]["head_gradient"] == \
        "ophav-plugin-example 0.1.0"

    bad = _ophav(python, root, "run", "portrait.png", "--out", "bad", *FAKES, "--restorer", "unsharp", "--set",
                 "restorer.sharpness=2")
    assert bad.returncode == 2 and "Extra inputs are not permitted" in bad.stderr


@pytest.mark.slow
def test_installed_plugin_in_an_ablation_grid(fresh_env):
    python, _, root = fresh_env
    save_png(root / "person.png", synthetic_portrait(64, seed=2).image)
    (root / "grid.yaml").write_text(
        "portraits: [person.png]\n"
        "base: {profile: tiny, device: cpu, image2video: fake, segmenter: fake, tracker: fake, field: fake}\n"
        "axes:\n  restorer: [unsharp, {name: unsharp, options: {amount: 3.0}}]\n  rounds: [1]\n"
        "eval: {every: 3, metrics: [psnr, ssim, head_gradient]}\n")
    study = _ophav(python, root, "ablate", "grid.yaml", "--out", "study", "-q")
    assert study.returncode == 0, study.stderr
    results = json.loads((root / "study/study.json").read_text())["cells"]
    assert len(results) == 2 and all(r["status"] == "done" for r in results.values())
    assert "| unsharp(amount=3.0) | 1 | 1 |" in study.stdout and "grad↑" in study.stdout  # the third party's metric
    with open(root / "study/results.csv") as handle:
        header = handle.readline().strip().split(",")
    assert "head_gradient" in header


@pytest.mark.slow
def test_the_plugin_passes_its_own_tests_in_the_fresh_env(fresh_env):
    python, source, root = fresh_env
    result = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             str(source / "tests")], capture_output=True, text=True, env=_env(root), cwd=source,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout  # the entry-point test ran (the package is installed here)
