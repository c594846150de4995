"""The chat page at / in headless Chromium (Playwright): attach an image, ask, watch the streamed answer.

Needs the Debian `chromium` package (/usr/bin/chromium) and `pip install playwright`; the browser bundles
of `playwright install` are not used (nothing is downloaded)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving_helpers import start_live_server

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


def _api_answer(url: str, image_url: str, key: str) -> str:
    """The API's greedy answer to the request the page sends for the first turn."""
    content = [
        {"type": "text", "text": "What colour is the shape?"},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    body = {"model": "tiny-metalm", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0}  # fmt: skip
    r = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_chat_page_with_image(serving_model_dir, tmp_path):
    """The page, with an API key typed in, answers greedily exactly what the API answers."""
    image = tmp_path / "shape.png"
    Image.new("RGB", (64, 64), (30, 160, 60)).save(image)
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    engine, server = start_live_server(serving_model_dir, api_key="page-key")
    console_errors: list[str] = []
    try:
        with server, sync_api.sync_playwright() as pw:
            expected = _api_answer(server.url, image_url, "page-key")
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 900, "height": 640})
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
                page.goto(server.url + "/")
                # Locator assertions, not wait_for_function: the page's CSP (rightly) forbids eval.
                sync_api.expect(page.locator("#model-name")).to_have_text("API key needed")
                console_errors.clear()  # the 401 of the keyless model lookup is expected
                page.on("pageerror", lambda e: console_errors.append(str(e)))
                page.fill("#api-key", "page-key")
                page.dispatch_event("#api-key", "change")
                sync_api.expect(page.locator("#model-name")).to_have_text("tiny-metalm")
                assert page.evaluate("sessionStorage.getItem('metalm-api-key')") == "page-key"
                page.set_input_files("#image-input", str(image))
                page.wait_for_selector("#attachments .thumb img")
                page.fill("#max-tokens", "12")
                page.fill("#temperature", "0")
                page.fill("#prompt", "What colour is the shape?")
                page.click("#send")
                answer = page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=30_000)
                assert answer.inner_text().strip() == expected.strip() and expected.strip()
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


def test_chat_page_sends_an_attached_audio_clip(tmp_path):
    """An attached WAV goes out as an OpenAI input_audio part (played back in the user's bubble); a file
    that is neither WAV nor MP3 is refused on the page."""
    soundfile = pytest.importorskip("soundfile")
    from tests.test_audio import tone
    from tests.test_audio_interfaces import _build_audio_model

    model_dir = _build_audio_model(tmp_path / "model")
    clip, other = tmp_path / "question.wav", tmp_path / "question.flac"
    soundfile.write(clip, tone(440, 0.6), 16_000)
    soundfile.write(other, tone(440, 0.6), 16_000)
    engine, server = start_live_server(model_dir)
    errors: list[str] = []
    try:
        with server, sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.goto(server.url + "/")
                sync_api.expect(page.locator("#model-name")).to_have_text("tiny-metalm")
                page.set_input_files("#audio-input", str(other))
                sync_api.expect(page.locator(".msg.error")).to_contain_text("attach a WAV or MP3 clip")
                page.set_input_files("#audio-input", str(clip))
                page.wait_for_selector("#attachments .thumb.clip")
                page.fill("#max-tokens", "3")
                with page.expect_request("**/v1/chat/completions") as sent:
                    page.click("#send")
                page.wait_for_selector('.msg.assistant[data-state="done"]', timeout=30_000)
                part = sent.value.post_data_json["messages"][0]["content"][0]
                assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
                assert base64.b64decode(part["input_audio"]["data"]) == clip.read_bytes()
                assert page.locator(".msg.user audio").count() == 1
                assert page.locator(".msg.error").count() == 1  # only the refused .flac
            finally:
                browser.close()
    finally:
        engine.close()
    assert not errors, errors
