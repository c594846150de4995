"""The chat page at / in headless Chromium (Playwright): attach an image, ask, watch the streamed answer.

Needs the Debian `chromium` package (/usr/bin/chromium) and `pip install playwright`; the browser bundles
of `playwright install` are not used (nothing is downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.test_serving import serving_model_dir, start_live_server  # noqa: F401  (fixture re-export)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed: pip install playwright (no `playwright install`)",
)
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() or shutil.which("chromium")),
    reason="Chromium is not installed: apt-get install -y chromium",
)


def test_chat_page_with_image(serving_model_dir, tmp_path):  # noqa: F811
    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (30, 160, 60)).save(image)
    engine, server = start_live_server(serving_model_dir)
    console_errors: list[str] = []
    try:
        with server, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 900, "height": 640})
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: console_errors.append(str(e)))
                page.goto(server.url + "/")
                # Locator assertions, not wait_for_function: the page's CSP (rightly) forbids eval.
                sync_api.expect(page.locator("#model-name")).to_have_text("tiny-metalm")
                page.set_input_files("#image-input", str(image))
                page.wait_for_selector("#attachments .thumb img")
                page.fill("#max-tokens", "12")
                page.fill("#prompt", "What colour is the shape?")
                page.click("#send")
                answer = page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=30_000)
                text = answer.inner_text().strip()
                assert text and text != "(empty answer)"
                assert page.locator(".msg.error").count() == 0
                assert page.locator(".msg.user img").count() == 1  # the image went with the question
                # A second turn keeps the history (the image included) and streams again.
                page.fill("#prompt", "And its shape?")
                page.keyboard.press("Enter")
                done = page.locator('.msg.assistant[data-state="done"]')
                sync_api.expect(done).to_have_count(2, timeout=30_000)
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "webpage.png"), full_page=True)
            finally:
                browser.close()
    finally:
        engine.close()
    # Violations of the page's Content-Security-Policy show up as console errors.
    assert not console_errors, console_errors
    assert (ARTIFACTS / "webpage.png").stat().st_size > 1000
