"""The demo in a real browser: headless Debian Chromium (`/usr/bin/chromium`) driven by Playwright.

Playwright's own browser download does not work here, so the system Chromium is launched by path (never
run `playwright install`). Skipped only on a developer machine without Chromium or Playwright; with `CI` set
in the environment a missing browser is a failure, so CI cannot pass by skipping. Screenshots go to
`out/app_browser/` (or `$VLM_SCREENSHOTS`) to be looked at.

Every wait is Playwright's (`expect`, `wait_for_function`, with timeouts), never a sleep: a streamed answer
has ended when the page's Stop-able event is over, which the server's generator (watched by `Decoding`)
says exactly.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio.utils import get_upload_folder
from test_app import EXAMPLES, PHOTO, STORY, Decoding, serve
from tiny import build

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


@pytest.fixture
def decoding(monkeypatch) -> Iterator[Decoding]:
    watch = Decoding(monkeypatch)
    yield watch
    watch.release()


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
    app, url = serve(model=build(parts))
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


def last_answer(page):
    return page.locator('#chatbot [data-testid="bot"]').last


def set_number(box, value: str, tries: int = 3) -> None:
    """Type `value` into a slider's number box until the box holds it. Once in nine CI runs the box read its
    default (256) again after the fill: the slider, just shown by its accordion, re-set its input. The setting
    reaching the model is asserted on the server, so a retry here hides nothing the test checks."""
    from playwright.sync_api import expect

    for attempt in range(tries):
        box.fill(value)
        box.press("Enter")
        try:
            expect(box).to_have_value(value, timeout=2_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


def ask(page, question: str) -> None:
    page.fill("#chat-question textarea", question)
    page.press("#chat-question textarea", "Enter")


def test_chat_with_an_uploaded_image(page, decoding, tmp_path) -> None:
    from playwright.sync_api import expect

    example = EXAMPLES[0]
    image = tmp_path / f"{uuid.uuid4().hex}.png"  # a name of its own, to find its upload in Gradio's folder
    shutil.copy(example.path, image)
    page.locator("#chat-image input[type=file]").set_input_files(str(image))
    expect(page.locator("#chat-image img")).to_be_visible()
    page.get_by_text("Generation settings").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    expect(tokens).to_be_visible()
    set_number(tokens, "24")
    decoding.hold(1, block=False)  # to know the answer on the server
    ask(page, example.question)

    stop = decoding.wait_held()
    decoding.wait_left(stop)
    assert decoding.settings[stop]["max_new_tokens"] == 24  # the setting reached the model
    answer = decoding.answers[stop]
    assert answer.strip()
    expect(last_answer(page)).to_have_text(answer.strip(), use_inner_text=True)  # the whole answer shows
    expect(page.locator('#chatbot [data-testid="user"]').last).to_contain_text(example.question)
    assert page.locator("#chatbot img").count() >= 1  # the image shows in the conversation
    assert page.input_value("#chat-question textarea") == ""  # the input was cleared for the next turn
    assert list(Path(get_upload_folder()).rglob(image.name)) == []  # the upload was deleted once read
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "chat.png", full_page=True)

    # a bad turn (no question) gets a friendly reply, and the chat goes on
    page.click("#chat-send")
    expect(last_answer(page)).to_contain_text("Type a question")


@pytest.mark.parametrize("button", ["#chat-stop", "#chat-clear"])
def test_stop_and_clear_end_the_answer(page, decoding, button) -> None:
    """The buttons' real wiring: the handler's stop for the session, and (checked for Stop) Gradio's
    `cancels=`: the page posts `/cancel` for the chat event. The answer is held on the server after its 3rd
    step, so the click lands mid-answer; at most one more step runs after its stop."""
    from playwright.sync_api import expect

    decoding.hold(3, until_cancel=button == "#chat-stop")
    ask(page, STORY)
    stop = decoding.wait_held()
    expect(last_answer(page)).not_to_be_empty()  # it is streaming
    page.click(button)
    decoding.wait_left(stop)
    assert not decoding.timed_out, f"{button} did not reach the generator"
    assert decoding.steps[stop] <= 4 and decoding.after_stop[stop] <= 1
    if button == "#chat-clear":
        expect(page.locator('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')).to_have_count(0)
        return
    decoding.wait_cancels(1)  # `cancels=`: the page asked Gradio to cancel the chat event
    # the answer stays as far as it got: the page shows no more than the server generated
    shown = last_answer(page).inner_text().strip()
    assert shown and decoding.answers[stop].strip().startswith(shown), (shown, decoding.answers[stop])
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / "stopped.png", full_page=True)


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
