"""The demo in headless Chromium, as a person uses it: pick an example, submit, see the overlay; a bad input shows
an error in the page. Marker ``e2e`` (``make test-e2e``); needs Debian's ``chromium`` and the playwright package.

``TASKMLLM_E2E_SCREENSHOT=docs/demo.png`` saves the screenshot there (otherwise into the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.demo.conftest import SEG

pytestmark = pytest.mark.e2e
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def page(demo_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(demo_url)
        page.locator("#submit").wait_for(state="visible")
        yield page
        browser.close()


def test_example_submit_shows_overlay_and_screenshot(page, demo_pipeline, tmp_path):
    from taskmllm.demo.examples import example_file
    from tests.demo.conftest import visual_of

    from playwright.sync_api import expect

    page.locator("#examples").get_by_text(SEG[1]).first.click()  # the ShapesWorld segmentation example
    expect(page.locator("#instruction textarea")).to_have_value(SEG[1])
    expect(page.locator("#input-image img")).to_be_visible()
    page.locator("#submit").click()
    overlay = page.locator("#overlay img")
    overlay.wait_for(state="visible")
    page.wait_for_function("() => { const i = document.querySelector('#overlay img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    want = demo_pipeline(visual_of(SEG[0]), SEG[1])
    assert overlay.evaluate("i => [i.naturalWidth, i.naturalHeight]") == list(want.image.size)
    page.locator("#chat").get_by_text(want.text).first.wait_for(state="visible")
    assert "Latency" in page.locator("#latency").inner_text()
    assert example_file(SEG[0]).is_file()
    shot = Path(os.environ.get("TASKMLLM_E2E_SCREENSHOT") or tmp_path / "demo.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_empty_instruction_shows_an_error_and_the_page_keeps_working(page):
    page.locator("#instruction textarea").fill("   ")
    page.locator("#submit").click()
    page.get_by_text("the instruction is empty").first.wait_for(state="visible")
    page.locator("#instruction textarea").fill(SEG[1])
    page.locator("#submit").click()
    page.locator("#chat").get_by_text(SEG[1]).nth(1).wait_for(state="visible")  # a second turn was answered
