"""report.html as a person sees it: opened in a real (headless) Chromium, every image must load."""
import re
import shutil
import subprocess

import pytest

from ophav_core.config import build_config, resolve
from ophav_core.plugins import build_host
from ophav_core.pipeline.scheduler import Scheduler
from ophav_core.testing.fakes import FAKE_CONFIG, FakePlugin

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PROBE = ("<script>window.addEventListener('load',()=>{const s=[...document.images].map(i=>i.complete&&i.naturalWidth>0);"
         "document.title='IMAGES:'+s.length+':'+s.filter(Boolean).length+':'+document.querySelectorAll('video').length;"
         "});</script>")


@pytest.fixture
def run_dir(tmp_path, portrait_file):
    registry = build_host(extra_plugins=[("fakes", FakePlugin())], load_entry_points=False).registry
    flags = {k: v["name"] for k, v in FAKE_CONFIG.items()}
    flags.update(profile="tiny", rounds=2, device="cpu")
    Scheduler(tmp_path / "run", resolve(build_config(None, flags), registry), portrait_file, quiet=True).run()
    return tmp_path / "run"


def test_report_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "round2" in html and "preview.mp4" in html
    # Offline: nothing is fetched from elsewhere; images are embedded.
    assert not re.search(r"""(src|href)=["']https?://""", html)
    assert html.count("data:image/png;base64,") >= 6


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_opens_in_chromium_and_shows_its_images(run_dir, tmp_path):
    probe = run_dir / "report_probe.html"
    probe.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>IMAGES:(\d+):(\d+):(\d+)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    total, loaded, videos = map(int, title.groups())
    assert total >= 6 and loaded == total, f"{loaded} of {total} images loaded"
    assert videos == 1
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,2400", f"--screenshot={shot}", (run_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000
