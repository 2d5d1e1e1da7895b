"""The weight store: add, fetch (from a local HTTP server on loopback), verification, clear messages."""
import hashlib
import http.server
import threading
from functools import partial

import pytest

from ophav_core import weights as store
from ophav_core.errors import OphavError, UsageError, WeightsMissing


def make_weight(payload: bytes, **kw) -> store.WeightFile:
    return store.WeightFile(name="toy", filename="toy.bin", url="http://127.0.0.1:1/toy.bin", license="MIT",
                            needed_by="restorer toy", sha256=hashlib.sha256(payload).hexdigest(), **kw)


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPHAV_WEIGHTS", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_missing_weights_name_the_file_source_and_place(weights_dir):
    weight = make_weight(b"abc")
    with pytest.raises(WeightsMissing) as info:
        store.require(weight)
    message = str(info.value)
    assert "toy.bin" in message and weight.url in message and str(weights_dir) in message
    assert "ophav weights add toy" in message


def test_add_verifies_the_checksum(weights_dir, tmp_path):
    weight = make_weight(b"the real weights")
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"something else")
    with pytest.raises(UsageError, match="sha256"):
        store.add(weight, wrong)
    assert not (weights_dir / "toy.bin").exists()
    right = tmp_path / "right.bin"
    right.write_bytes(b"the real weights")
    assert store.add(weight, right) == weights_dir / "toy.bin"
    assert store.require(weight).read_bytes() == b"the real weights"
    assert store.status({"toy": weight}, full=True)[0]["state"] == "present"
    (weights_dir / "toy.bin").write_bytes(b"corrupted!")
    assert store.status({"toy": weight}, full=True)[0]["state"] == "corrupt"


def test_fetch_from_a_loopback_server(weights_dir, server):
    root, base = server
    payload = bytes(range(256)) * 4096
    (root / "toy.bin").write_bytes(payload)
    weight = make_weight(payload)
    path = store.fetch(weight, url=f"{base}/toy.bin", quiet=True)
    assert path.read_bytes() == payload


def test_fetch_that_fails_verification_stores_nothing(weights_dir, server):
    root, base = server
    (root / "toy.bin").write_bytes(b"tampered")
    weight = make_weight(b"original")
    with pytest.raises(OphavError, match="failed verification"):
        store.fetch(weight, url=f"{base}/toy.bin", quiet=True)
    assert not (weights_dir / "toy.bin").exists()
    assert not list(weights_dir.glob("*.part"))


def test_fetch_unreachable_address_says_what_to_do(weights_dir, server):
    _, base = server
    weight = make_weight(b"x")
    with pytest.raises(OphavError, match="ophav weights add toy"):
        store.fetch(weight, url=f"{base}/missing.bin", quiet=True, timeout=5)


def test_structural_verification_without_checksum(weights_dir, tmp_path):
    weight = store.WeightFile(name="s", filename="s.npz", url="u", license="MIT", needed_by="x",
                              verify="numpy:load")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an archive")
    assert "not a s.npz" in store.verify(weight, bad)
