"""serve.app: `diffattr serve`'s web app on a real localhost port — an upload answered with
the top-k, only the run's own images served, bad uploads refused with a message while the
server keeps running, concurrent queries answered alike, the run directory unchanged."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from diffattr.attribution.features.featurize import FeatureSettings

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def tree_state(path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, make_tiny_run):
    from diffattr.serve.app import make_app

    run = make_tiny_run(tmp_path_factory.mktemp("serve") / "run")
    kwargs = {"settings": FeatureSettings(timesteps=2), "progress": False}
    app = make_app(run, "das", index_kwargs=kwargs, k=5, max_upload=4096)  # builds the index
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    before = tree_state(run.path)
    yield f"http://127.0.0.1:{port}", run, before
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: bytes | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body or b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


IMAGE = png((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8))


def test_an_upload_gets_its_top_k_and_the_page_loads(server):
    base, run, _ = server
    status, answer = post(f"{base}/api/query?name=mine.png", IMAGE)
    assert status == 200, answer
    assert answer["method"] == "das" and answer["target"]["source"] == "mine.png"
    props = answer["answer"]["proponents"]
    assert len(props) == 5 and props[0]["score"] >= props[-1]["score"]
    assert "das" in answer["target"] and "near_copy" in answer["target"]
    status, page = get(f"{base}/")
    assert status == 200 and b"Which training images made this image?" in page
    status, info = get(f"{base}/api/info")
    assert json.loads(info)["num_train"] == 24
    status, thumb = get(f"{base}/api/images/train/{props[0]['train_id']}")
    assert status == 200 and thumb.startswith(b"\x89PNG")
    status, sample = post(f"{base}/api/query?sample=1", None)
    assert status == 200 and sample["target"]["id"] == 1


@pytest.mark.parametrize(
    "path",
    ["/api/images/train/999999", "/api/images/train/..%2F..%2Frun.json", "/api/images/etc/passwd",
     "/api/images/sample/7", "/../run.json", "/api/images/train/-1"],
)  # fmt: skip
def test_nothing_but_the_runs_own_images_is_served(server, path):
    base, _, _ = server
    status, body = get(base + path)
    assert status == 404
    assert b'"dataset"' not in body and b"family" not in body  # no file contents leak


def test_bad_uploads_are_refused_with_a_message_and_the_server_goes_on(server):
    base, _, _ = server
    status, err = post(f"{base}/api/query?name=notes.txt", b"not an image at all")
    assert status == 400 and "not an image" in err["error"]
    status, err = post(f"{base}/api/query", b"")
    assert status == 400 and "empty" in err["error"]
    big = png((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    status, err = post(f"{base}/api/query?name=big.png", big)
    assert status == 413 and "limit" in err["error"]
    rgb = png((np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8))
    status, err = post(f"{base}/api/query?name=colour.png", rgb)
    assert status == 400 and "channel" in err["error"]
    status, _ = post(f"{base}/api/query?name=again.png", IMAGE)
    assert status == 200


def test_concurrent_queries_all_answer_alike_and_the_run_is_unchanged(server):
    base, run, before = server
    _, want = post(f"{base}/api/query?name=mine.png", IMAGE)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(f"{base}/api/query?name=mine.png", IMAGE), range(8)))
    assert all(status == 200 and a == want for status, a in answers)
    assert tree_state(run.path) == before
