"""The rating page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) opens index.html
from disk, a rater rates every image with the keyboard, reloads mid-way, exports the CSV, and `harness rate
summarize` reads it back.

The browser is driven through chromedriver's W3C WebDriver HTTP protocol with a few lines of urllib (no Selenium
in the environment, and nothing is downloaded at run time).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from rate_fixtures import make_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file()
                                                 else None)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
KEYS = {"ArrowRight": "\ue014", "ArrowLeft": "\ue012"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                              "chromium-driver); .ci/run installs them before the slow suite"),
]


class WebDriver:
    """The handful of W3C WebDriver commands the test needs, over chromedriver's local HTTP endpoint."""

    def __init__(self, download_dir: Path, profile: Path, size=(1366, 768)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"}, "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}", "--no-first-run",
                     "--hide-scrollbars", "--force-device-scale-factor=1"],
            "prefs": {"download.default_directory": str(download_dir), "download.prompt_for_download": False}}}
        try:
            self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]
        except Exception:
            self.proc.kill()
            raise
        self.cmd("POST", "/goog/cdp/execute", {"cmd": "Browser.setDownloadBehavior",
                                              "params": {"behavior": "allow", "downloadPath": str(download_dir)}})

    def _call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"webdriver {method} {path}: {e.read()[:500]!r}") from None

    def cmd(self, method: str, path: str, body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        got = self.cmd("POST", "/element", {"using": "css selector", "value": css})
        assert isinstance(got, dict) and ELEMENT in got, f"no element {css}: {got}"
        return got[ELEMENT]

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def keys(self, *names: str) -> None:
        acts = []
        for n in names:
            k = KEYS.get(n, n)
            acts += [{"type": "keyDown", "value": k}, {"type": "keyUp", "value": k}]
        self.cmd("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": acts}]})

    def text(self, element_id: str) -> str:
        return self.js(f"return document.getElementById({element_id!r}).textContent")

    def refresh(self) -> None:
        self.cmd("POST", "/refresh", {})

    def resize(self, width: int, height: int) -> None:
        self.cmd("POST", "/window/rect", {"width": width, "height": height})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.cmd("POST", "/se/log", {"type": "browser"}) if e["level"] == "SEVERE"]

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def wait_for(pred, timeout: float = 15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def not_blank(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert a.std() > 10, f"{path} looks blank (pixel std {a.std():.1f})"


def answer_for(pos: int) -> tuple[str, str]:
    """The keys the test presses at 1-based position `pos`: a Likert value and R/S."""
    return str(1 + pos % 5), ("r" if pos % 2 == 0 else "s")


def test_rate_page_in_chromium(tmp_path, sample_dir, run_cli):
    runs, split = make_runs(tmp_path, sample_dir)
    study = tmp_path / "study"
    code, out, err = run_cli("rate", "make", *[r.dir for r in runs], "--per-source", "4", "--by", "finding",
                             "--turing", "--split", split, "--out", study, "--seed", "3")
    assert code == 0, err
    key = json.loads((study / "key.json").read_text())
    n = len(key["items"])
    assert n == 12
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wd = WebDriver(downloads, tmp_path / "profile")
    try:
        wd.get((study / "index.html").resolve().as_uri())
        assert wd.js("return document.getElementById('rate').hidden") is True
        wd.screenshot(tmp_path / "start-1366x768.png")
        wd.type("#rater", "dr a")  # the page makes it a safe file name: dr_a
        wd.click("#begin")
        assert wd.text("progress") == f"1 / {n}"
        assert wd.text("rater-name") == "dr_a"
        # a sanity check on the keys themselves: 3 then 4 leaves 4 (answers can be changed)
        wd.keys("3", "4", "s")
        assert wd.js("return document.querySelector('input[name=likert]:checked').value") == "4"
        assert wd.js("return document.querySelector('input[name=turing]:checked').value") == "synthetic"
        wd.keys("ArrowLeft")  # nothing before the first image
        assert wd.text("progress") == f"1 / {n}"
        half = n // 2
        for pos in range(1, half + 1):
            assert wd.text("progress") == f"{pos} / {n}"
            wd.keys(*answer_for(pos), "ArrowRight")
        assert wd.text("rated") == f"{half} rated"
        wd.screenshot(tmp_path / "rating-1366x768.png")
        shown_before = wd.js("return document.getElementById('image').src")

        wd.refresh()  # closing the tab loses nothing: rater, position and answers come back from localStorage
        wait_for(lambda: wd.js("return !document.getElementById('rate').hidden"))
        assert wd.text("progress") == f"{half + 1} / {n}"
        assert wd.text("rated") == f"{half} rated"
        assert wd.js("return document.getElementById('image').src") == shown_before
        wd.keys("ArrowLeft")
        lik, tur = answer_for(half)
        assert wd.js("return document.querySelector('input[name=likert]:checked').value") == lik
        assert wd.js("return document.querySelector('input[name=turing]:checked').value") == \
            ("real" if tur == "r" else "synthetic")
        wd.keys("ArrowRight")

        for pos in range(half + 1, n + 1):
            assert wd.text("progress") == f"{pos} / {n}"
            wd.keys(*answer_for(pos), "ArrowRight")
        assert wd.text("progress") == f"{n} / {n}"  # the last image stays
        assert wd.text("rated") == f"{n} rated"
        assert "All 12 images rated" in wd.text("status")

        shots = {}
        for name, (w, h) in {"desktop-1366x768": (1366, 768), "tablet-820x1180": (820, 1180)}.items():
            wd.resize(w, h)
            time.sleep(0.3)
            shots[name] = wd.screenshot(tmp_path / f"{name}.png")
            not_blank(shots[name])
            # readable: the whole image and every control on screen without scrolling at 1366x768; labels present
            if name.startswith("desktop"):
                bottom = wd.js("return Math.max(...['image','likert','turing','next'].map(i => "
                               "document.getElementById(i).getBoundingClientRect().bottom))")
                assert bottom <= wd.js("return window.innerHeight") + 1
        unlabeled = wd.js("return [...document.querySelectorAll('input, button')].filter(e => !(e.labels && "
                          "e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()).length")
        assert unlabeled == 0

        # a second rater on the same browser starts afresh; switching back restores the first one's answers
        wd.resize(1366, 768)
        wd.click("#switch")
        wd.type("#rater", "dr_b")
        wd.click("#begin")
        assert wd.text("progress") == f"1 / {n}" and wd.text("rated") == "0 rated"
        wd.keys("5", "r")
        assert wd.text("rated") == "1 rated"
        wd.click("#switch")
        wd.type("#rater", "dr_a")
        wd.click("#begin")
        assert wd.text("rated") == f"{n} rated" and wd.text("rater-name") == "dr_a"

        wd.click("#export")
        target = downloads / "ratings-dr_a.csv"
        wait_for(lambda: target.is_file() and target.stat().st_size > 0)
        time.sleep(0.3)
        assert wd.console_errors() == []  # no script error anywhere on the way
    finally:
        wd.quit()

    rows = list(csv.DictReader(io.StringIO(target.read_text(encoding="utf-8"))))
    assert len(rows) == n
    assert {r["item"] for r in rows} == {it["id"] for it in key["items"]}
    for r in rows:
        lik, tur = answer_for(int(r["position"]))
        assert r["likert"] == lik and r["turing"] == ("real" if tur == "r" else "synthetic")
        assert r["rater"] == "dr_a" and r["study"] == key["study"] and r["answered_at"]
    # the per-rater order is a shuffle of the page's own order
    assert [r["item"] for r in rows] != [it["id"] for it in key["items"]] or n < 3

    code, out, err = run_cli("rate", "summarize", study / "key.json", target, "--no-leaderboard", "--n-boot", "200")
    assert code == 0, err
    summary = json.loads((study / "summary.json").read_text())
    assert summary["raters"][0]["rater"] == "dr_a" and summary["raters"][0]["likert_answers"] == n
