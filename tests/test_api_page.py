"""The page (GET /) in a headless Chromium (Debian's `chromium`, driven by playwright's Python package with
no browser download): it opens the WebSocket with the key, feeds the video element through Media Source
Extensions, and the test reads from the page that the element decoded frames and played, then keeps a
screenshot (PNG) in the test's tmp folder and, if HELIOS_TEST_ARTIFACTS names a folder, there too."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.api_helpers import KEY, make_app, serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                "chromium; `make test` installs it when run as root)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="module")
def page_url(artifacts, tmp_path_factory):
    with serving(make_app(artifacts, tmp_path_factory.mktemp("jobs"))) as (url, _):
        yield url


def test_page_plays_a_live_stream(page_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url + "/")
            page.fill("#key", KEY)
            page.fill("#frames", "66")
            page.click("#start")
            page.wait_for_function("window.heliosPage.status === 'completed'", timeout=120_000)
            # the video element decoded frames and played past the first chunk's 33 frames (1.375 s at 24 fps)
            page.wait_for_function("document.getElementById('video').currentTime > 1.5", timeout=60_000)
            state = page.evaluate("""() => { const v = document.getElementById('video');
                const q = v.getVideoPlaybackQuality();
                return {decoded: q.totalVideoFrames, dropped: q.droppedVideoFrames, time: v.currentTime,
                        width: v.videoWidth, height: v.videoHeight, chunks: window.heliosPage.chunks,
                        latency: window.heliosPage.firstChunkLatency, buffered: v.buffered.end(0),
                        shown: document.getElementById('latency').textContent}; }""")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert not errors, errors
    assert (state["width"], state["height"], state["chunks"]) == (128, 64, 2), state
    assert state["decoded"] >= 33 and state["time"] > 1.5, state  # frames decoded and played
    assert abs(state["buffered"] - 65 / 24) < 0.1, state  # both chunks appended back to back (65 frames)
    assert state["latency"] > 0 and state["shown"] != "-", state
    assert shot.stat().st_size > 1000
    keep = os.environ.get("HELIOS_TEST_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "api-page.png")


def test_page_plays_chunk_0_before_chunk_1_arrives(page_url):
    """The first chunk is appended and plays as soon as it arrives (it used to wait for chunk 1's bytes)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_url + "/")
            page.fill("#key", KEY)
            page.fill("#frames", "66")
            page.click("#start")
            page.wait_for_function("window.heliosPage.status === 'completed'", timeout=120_000)
            page.wait_for_function("window.heliosPage.playingAt != null", timeout=30_000)
            t = page.evaluate("({arrivals: window.heliosPage.arrivals, appended: window.heliosPage.appended, "
                              "playing: window.heliosPage.playingAt})")
        finally:
            browser.close()
    assert len(t["arrivals"]) == 2 and len(t["appended"]) == 2, t
    # chunk 1 is paced one chunk period (1.375 s at 24 fps) after chunk 0: chunk 0 is in the buffer and
    # playing before chunk 1's first message arrives
    assert t["appended"][0] < t["arrivals"][1], t
    assert t["playing"] < t["arrivals"][1], t


def test_page_without_a_valid_key_says_so(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_url + "/")
            page.fill("#key", "wrong-key-0123456789abcdef")
            page.click("#start")
            page.wait_for_function("window.heliosPage.status && window.heliosPage.status.startsWith('refused')",
                                   timeout=30_000)  # raises TimeoutError if the page never says so
            assert page.evaluate("window.heliosPage.status").startswith("refused")
        finally:
            browser.close()
