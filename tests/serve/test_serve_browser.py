"""`diffattr serve` in a real browser: headless Chromium, driven over the DevTools protocol,
chooses an image file in the page's upload field and sees the answer (proponents with their
images, κ, the near-copy verdict), at desktop and phone width. Skipped without Chromium or
the ``websocket-client`` package. With ``DIFFATTR_ARTIFACTS`` set the screenshots are copied
to ``test-artifacts/`` at the repository root."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffattr.attribution.features.featurize import FeatureSettings
from diffattr.run import RunDir

pytestmark = pytest.mark.slow
websocket = pytest.importorskip("websocket")
uvicorn = pytest.importorskip("uvicorn")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


class DevTools:
    """A minimal DevTools-protocol client of one page."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        end = time.time() + timeout
        while time.time() < end:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, make_tiny_run):
    from diffattr.serve.app import make_app

    out = make_tiny_run(tmp_path_factory.mktemp("serve-browser") / "run", samples=3).path
    kwargs = {"settings": FeatureSettings(timesteps=2), "progress": False}
    app = make_app(RunDir(out), "das", index_kwargs=kwargs, k=6)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(chromium_binary, tmp_path_factory):
    port = free_port()
    profile = tmp_path_factory.mktemp("chromium-serve")
    proc = subprocess.Popen(
        [chromium_binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", "--hide-scrollbars", f"--remote-debugging-port={port}",
         f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("headless chromium did not open its DevTools port")
        yield DevTools(pages[0]["webSocketDebuggerUrl"])
    finally:
        proc.terminate()
        proc.wait(timeout=20)


SCREENS = [("serve.png", 1200, 900, False), ("serve-phone.png", 390, 844, True)]


@pytest.mark.parametrize("name,width,height,mobile", SCREENS)
def test_upload_an_image_and_see_the_answer(
    browser, page_url, tmp_path, name, width, height, mobile
):
    image = tmp_path / "my digit.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(image)
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                 deviceScaleFactor=1, mobile=mobile)  # fmt: skip
    browser.call("Page.enable")
    browser.call("Page.navigate", url=page_url)
    browser.wait_for("document.querySelectorAll('#samples img').length === 3")
    root = browser.call("DOM.getDocument")["root"]["nodeId"]
    node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    browser.call("DOM.setFileInputFiles", nodeId=node, files=[str(image)])
    browser.wait_for("document.querySelectorAll('#proponents figure').length === 6")
    assert browser.evaluate("document.getElementById('name').textContent").startswith("my_digit")
    assert "κ =" in browser.evaluate("document.getElementById('kappa').textContent")
    assert "near copy" in browser.evaluate("document.getElementById('verdict').textContent")
    loaded = "[...document.querySelectorAll('#proponents img')].every(i => i.naturalWidth > 0)"
    browser.wait_for(loaded)
    assert browser.evaluate("document.getElementById('error').textContent") == ""
    overflow = "document.documentElement.scrollWidth <= window.innerWidth"
    assert browser.evaluate(overflow), "the page is wider than the screen"
    shot = tmp_path / name
    data = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    shot.write_bytes(base64.b64decode(data["data"]))
    assert Image.open(shot).size[0] == width
    if os.environ.get("DIFFATTR_ARTIFACTS"):
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(shot, ARTIFACTS / name)
