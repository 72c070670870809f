"""A live prompt change seen in the page (GET /, headless Chromium as in test_api_page): a stream of the trained
tiny checkpoint starts red, the prompt is changed to blue after the first chunk arrives, and the pixels of the
page's <video> (drawn to a canvas in the page) show red before the chunk the server names and blue from it on,
that chunk being the next one not yet started."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helios_deploy.measure.adherence import frame_shape
from tests.api_helpers import KEY, make_app, serving
from tests.test_api_page import CHROMIUM, FLAGS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y "
                                 "chromium; `make test` installs it when run as root)")]
OLD, NEW = "a red square moving right", "a blue square moving right"
CHUNKS = 3

# Every sampled frame of the element: pause, seek to the middle of each chunk, draw to a canvas, read RGB.
READ_FRAMES = """async (times) => {
  const v = document.getElementById('video');
  v.pause();
  const c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const ctx = c.getContext('2d', { willReadFrequently: true });
  const out = [];
  for (const t of times) {
    await new Promise((resolve) => { v.addEventListener('seeked', resolve, { once: true }); v.currentTime = t; });
    ctx.drawImage(v, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    const rgb = [];
    for (let i = 0; i < d.length; i += 4) rgb.push(d[i], d[i + 1], d[i + 2]);
    out.push(rgb);
  }
  return { width: c.width, height: c.height, frames: out };
}"""


@pytest.fixture(scope="module")
def page_url(trained_artifacts, tmp_path_factory):
    with serving(make_app(trained_artifacts, tmp_path_factory.mktemp("jobs"))) as (url, _):
        yield url


def test_a_prompt_change_shows_in_the_page(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url + "/")
            page.fill("#key", KEY)
            page.fill("#prompt", OLD)
            page.fill("#frames", str(33 * CHUNKS))
            page.click("#start")
            page.wait_for_function("window.heliosPage.chunks >= 1", timeout=120_000)
            seen_at_change = page.evaluate("window.heliosPage.chunks")
            page.fill("#newprompt", NEW)
            page.click("#change")
            page.wait_for_function("window.heliosPage.status === 'completed'", timeout=120_000)
            log = page.inner_text("#log")
            times = [(33 * j + 16.5) / 24 for j in range(CHUNKS)]  # the middle frame of each chunk
            page.wait_for_function(f"document.getElementById('video').buffered.end(0) > {times[-1] + 0.1}",
                                   timeout=60_000)
            read = page.evaluate(READ_FRAMES, times)
        finally:
            browser.close()
    assert not errors, errors
    from_chunk = int(re.search(r"prompt changed from chunk (\d+)", log).group(1))
    # the next chunk not started when the change came: at most one past the last chunk the page had
    assert seen_at_change <= from_chunk <= seen_at_change + 1 and from_chunk < CHUNKS, (seen_at_change, from_chunk)
    colours = []
    for rgb in read["frames"]:
        frame = np.array(rgb, np.uint8).reshape(read["height"], read["width"], 3).astype(np.float32) / 255
        shape = frame_shape(frame)
        colours.append(shape and shape["colour"])
    # before the change: red; from it on: blue
    assert colours == ["red"] * from_chunk + ["blue"] * (CHUNKS - from_chunk), (colours, from_chunk)
