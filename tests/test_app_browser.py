"""The demo in a real browser: headless Debian Chromium (`/usr/bin/chromium`) driven by Playwright.

Playwright's own browser download does not work here, so the system Chromium is launched by path (never
run `playwright install`). Skipped only on a developer machine without Chromium or Playwright; with `CI` set
in the environment a missing browser is a failure, so CI cannot pass by skipping. Screenshots go to
`out/app_browser/` (or `$VLM_SCREENSHOTS`) to be looked at.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio.utils import get_upload_folder
from test_app import EXAMPLES, PHOTO, free_port
from tiny import build

from demo.app import launch

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # Debian's package; override to test elsewhere
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SHOTS = Path(os.environ.get("VLM_SCREENSHOTS", Path(__file__).resolve().parents[1] / "out" / "app_browser"))


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install -y --no-install-recommends chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; never `playwright install`)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if (why := _missing()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def url(parts) -> Iterator[str]:
    app, url = launch(model=build(parts), port=free_port(), block=False)
    yield url
    app.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("#chat-question textarea")
    yield page
    page.close()


def set_until_it_sticks(locator, value: str, tries: int = 20) -> None:
    """Type a value into a number box. The first edits after the page opens can be overwritten while the
    frontend settles, so re-type until the value holds for half a second."""
    for _ in range(tries):
        locator.fill(value)
        locator.press("Enter")
        time.sleep(0.5)
        if locator.input_value() == value:
            return
    raise AssertionError(f"the box kept {locator.input_value()!r} instead of {value!r}")


def wait_until_stable(locator, seconds: float = 1.0, timeout: float = 60.0) -> str:
    """The locator's text once it is non-empty and has not changed for `seconds` (the stream ended)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        text = locator.inner_text() if locator.count() else ""
        if text != last:
            last, since = text, time.monotonic()
        elif text.strip() and time.monotonic() - since >= seconds:
            return text
        time.sleep(0.1)
    raise AssertionError(f"no stable answer within {timeout} s (last: {last!r})")


def test_chat_with_an_uploaded_image(page, tmp_path) -> None:
    example = EXAMPLES[0]
    image = tmp_path / f"{uuid.uuid4().hex}.png"  # a name of its own, to find its upload in Gradio's folder
    shutil.copy(example.path, image)
    page.locator("#chat-image input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#chat-image img")
    page.get_by_text("Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    set_until_it_sticks(tokens, "24")
    page.fill("#chat-question textarea", example.question)
    page.press("#chat-question textarea", "Enter")

    answer = wait_until_stable(page.locator('#chatbot [data-testid="bot"]').last)
    assert answer.strip()
    assert tokens.input_value() == "24" and len(answer.split()) <= 24  # the setting reached the model
    user = page.locator('#chatbot [data-testid="user"]')
    assert example.question in user.last.inner_text()
    assert page.locator("#chatbot img").count() >= 1  # the image shows in the conversation
    assert page.input_value("#chat-question textarea") == ""  # the input was cleared for the next turn
    assert list(Path(get_upload_folder()).rglob(image.name)) == []  # the upload was deleted once read
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "chat.png", full_page=True)

    # a bad turn (no question) gets a friendly reply, and the chat goes on
    page.click("#chat-send")
    page.wait_for_selector('#chatbot [data-testid="bot"]:has-text("Type a question")')


def test_encoder_tab_maps_and_patch_click(page) -> None:
    page.get_by_role("tab", name="Encoder").click()
    page.locator("#enc-image input[type=file]").set_input_files(PHOTO)
    page.wait_for_selector("#enc-attention img")
    page.wait_for_selector("#enc-similarity img")
    page.wait_for_selector("text=row 3, column 3")  # the centre patch of the tiny model's 4x4 grid
    page.locator("#enc-similarity img").click(position={"x": 3, "y": 3})  # the top-left patch
    page.wait_for_selector("text=row 1, column 1")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "encoder.png", full_page=True)
