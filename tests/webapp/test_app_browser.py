"""The page in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it as
root when missing) opens the app (tests/app_server.py), shows the one-line error of a bad
setting, uploads the bundled speech and a reference video, presses Generate and waits for the video
element, which must have a playable source; a screenshot is saved (to $MODITALKER_SCREENSHOTS when
set), and the page must not have asked anything of another machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from app_server import running_app
from cdp_browser import Browser, find_chromium

from data.sample_data import SAMPLE_SPEECH

CHROMIUM, WHY = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=f"no headless Chromium: {WHY}")


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app")) as server:
        yield server


VIDEO_STATE = """(() => {
  const v = document.querySelector('#result video');
  if (!v || !v.currentSrc || v.readyState < 2) return null;  // HAVE_CURRENT_DATA: a frame decoded
  return {src: v.currentSrc, ready: v.readyState, duration: v.duration, error: v.error && v.error.code,
          width: v.videoWidth, height: v.videoHeight,
          h264: v.canPlayType('video/mp4; codecs="avc1.64001e, mp4a.40.2"')};
})()"""


def _set_number(b: Browser, elem_id: str, value: str) -> None:
    """Type ``value`` into a number field and make sure the page kept it: the value is set again until
    it has stayed for 0.5 s. (On a fresh clone under load the Settings field once lost its new value
    before Generate was clicked, so the run went ahead with the default and no error appeared.)"""
    field = f"document.querySelector('#{elem_id} input')"
    for _ in range(10):
        b.js(f"""(() => {{
          const el = {field};
          el.focus();
          el.value = '{value}';
          el.dispatchEvent(new Event('input', {{bubbles: true}}));
          el.dispatchEvent(new Event('change', {{bubbles: true}}));
          el.blur();
        }})()""")
        time.sleep(0.5)
        if b.js(f"{field}.value") == value:
            return
    raise AssertionError(f"#{elem_id} did not keep the value {value!r}")


def test_page_in_headless_chromium(app_server, tmp_path):
    torch.set_num_threads(1)
    shots = Path(os.environ.get("MODITALKER_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with Browser(CHROMIUM, width=1280, height=1000) as b:
        b.open(app_server.url, ready="!!document.querySelector('#generate')", timeout=120)
        b.set_files("#audio input[type=file]", SAMPLE_SPEECH)
        b.set_files("#ref_video input[type=file]", app_server.inputs["video"])
        b.wait_for(
            "!!document.querySelector('#ref_video video') && !document.querySelector('#audio input')", 60
        )

        # a bad setting: the command line's one line, in the page
        b.js("[...document.querySelectorAll('button')].find(e => e.textContent.includes('Settings')).click()")
        b.wait_for("!!document.querySelector('#steps input')", 30)
        _set_number(b, "steps", "0")
        b.js("document.querySelector('#generate').click()")
        toast = "document.querySelector('[data-testid=toast-text]')"
        b.wait_for(f"!!{toast}", 60)
        assert b.js(f"{toast}.innerText.trim()") == "atom.steps must be >= 1, got 0"
        b.screenshot(shots / "app_error.png", full_page=False)
        b.js("document.querySelector('[data-testid=toast-close]').click()")

        # the same page, a good setting: the server still serves it
        _set_number(b, "steps", str(app_server.job.defaults()["steps"]))
        b.js("document.querySelector('#generate').click()")
        video = b.wait_for(VIDEO_STATE, 300)
        assert video["error"] is None and video["h264"] in ("probably", "maybe")
        assert video["src"].startswith(app_server.url) and video["src"].endswith("talking_head.mp4")
        assert (video["width"], video["height"]) == (256, 256)
        assert video["duration"] == pytest.approx(4.18, abs=0.1)
        assert "stage timings" in b.js("document.querySelector('#log textarea').value")
        b.js("window.scrollTo(0, 0)")
        shot = b.screenshot(shots / "app.png")
        assert shot.stat().st_size > 10_000
        outside = [u for u in b.requests if not u.startswith((app_server.url, "data:", "blob:"))]
        assert outside == []
