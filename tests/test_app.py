"""The Gradio demo (`demo/`) around a tiny random VLM (SmolLM2's real tokenizer).

The handlers called directly (streaming, multi-image chat, bad input, context truncation, stop, uploads
removed once read, encoder pictures, zero-shot), the `vlm demo` entry point, then the served app driven
through `gradio_client` (an answer, a cancelled stream, uploads removed, the upload cap, 20 concurrent
clients each getting its own answer, the shipped model and dual encoder). The browser test is
`test_app_browser.py`.

Stopping is checked by counting decode steps in the generator's worker (`Decoding`), which holds the answer
at a known step until its stop arrives: a tiny model decodes hundreds of tokens a second, so "it ended soon
after the stop" could not tell a working Stop from a no-op one."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import gradio.routes
import httpx
import pytest
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from PIL import Image
from tiny import VISION, build

import demo.app as demo_app
from demo.app import EXAMPLES, UNTRAINED, ZERO_SHOT_LABELS, build_app, describe_model, launch
from demo.handlers import KEEP_SIDE, SHOWN_SIDE, Handlers, Settings
from vlm.conversation import user
from vlm.data import EASY_VQA_COLORS, EASY_VQA_SHAPES
from vlm.model import DEFAULT_MODEL_DIR
from vlm.serving import DecodeBatch
from vlm.viz import patch_similarity
from vlm.zeroshot import DEFAULT_SIGLIP_DIR, load_dual_encoder, zero_shot

IMAGE = str(EXAMPLES[0].path)  # easy-VQA test image 0: a red triangle, 64x64
PHOTO = str(next(e.path for e in EXAMPLES if e.file == "chelsea.jpg"))
QUICK = dict(max_new_tokens=8, temperature=0.0, top_p=1.0)
LONG = dict(max_new_tokens=256, temperature=0.0, top_p=1.0)  # the tiny model does not end it by itself
STORY = "Tell me a long story."
HOLD_TIMEOUT = 20.0  # seconds a held answer waits for its stop before the test gives up on it


@pytest.fixture(scope="module")
def tokenizer(parts):
    return parts[1]


@pytest.fixture(scope="module")
def model(parts):
    return build(parts)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> Path:
    """The handlers' upload folder (Gradio's, for a served app)."""
    return tmp_path_factory.mktemp("gradio-uploads")


@pytest.fixture(scope="module")
def demo(model, uploads) -> Handlers:
    handlers = Handlers(model, upload_folder=uploads)
    yield handlers
    handlers.close()


@pytest.fixture(scope="module")
def app(demo) -> gr.Blocks:
    return build_app(demo)


def upload(folder: Path, source: str | Path, name: str | None = None) -> str:
    """Copy a file into `folder` as Gradio files an upload: <folder>/<content hash>/<name>."""
    target = folder / uuid.uuid4().hex / (name or Path(source).name)
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    return str(target)


def chat(demo: Handlers, question: str, image: str | None = None, display=None, history=None, **settings):
    """Run one chat turn to the end: (all yields, final chatbot messages, final history)."""
    outs = list(demo.chat(question, image, display or [], history or [], **(QUICK | settings)))
    return outs, outs[-1][0], outs[-1][1]


def session(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name)  # what the handlers read of a gr.Request


class Decoding:
    """Watches the generator's worker (`vlm.serving.DecodeBatch`): each answer's decode steps, keyed by the
    answer's stop event, and how many of them began with that stop already set.

    `hold(n)`: the next answer to reach step n waits there, and after every later step, until its stop is set
    (polled; a stop that never comes fails the test after HOLD_TIMEOUT). So a stop lands at a known step,
    however fast the tiny model decodes. A Gradio cancel (`/cancel`) lets the held answer take one more step:
    Gradio waits for the thread reading the answer, which waits for a piece, before it closes the generator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: Counter[threading.Event] = Counter()
        self.after_stop: Counter[threading.Event] = Counter()
        self.left: set[threading.Event] = set()
        self.settings: dict[threading.Event, dict] = {}  # each answer's generation settings
        self.answers: dict[threading.Event, str] = {}  # each ended answer's whole text
        self.cancels = 0  # Gradio `/cancel` requests received
        self.timed_out = False
        self.held: threading.Event | None = None  # the stop of the answer being held
        self._hold_at: int | None = None
        self._block = True
        self._until_cancel = False
        self._credits = 0  # steps the held answer may take without its stop
        self._changed = threading.Condition()
        emit, cancel_tasks = DecodeBatch._emit_and_retire, gradio.routes.cancel_tasks

        def watched(batch: DecodeBatch) -> None:  # once per step, for every row of the batch
            rows = list(batch.rows)
            stops = [row.request.stop for row in rows]
            with self._changed:
                for row, stop in zip(rows, stops, strict=True):
                    self.steps[stop] += 1
                    self.after_stop[stop] += stop.is_set()
                    self.settings.setdefault(stop, dict(row.request.settings))
            emit(batch)
            with self._changed:
                for row, stop in zip(rows, stops, strict=True):
                    if row not in batch.rows:
                        self.left.add(stop)
                        self.answers[stop] = row.sent
                if self.held is None and self._hold_at is not None:
                    self.held = next((s for s in stops if self.steps[s] == self._hold_at), None)
                self._changed.notify_all()
                if self.held in stops and self.held not in self.left and self._block and not self.timed_out:
                    deadline = time.monotonic() + HOLD_TIMEOUT
                    while not (self._released() or self._credits) and time.monotonic() < deadline:
                        self._changed.wait(0.01)
                    self.timed_out = not (self._released() or self._credits)
                    self._credits = max(0, self._credits - 1)

        async def counted(task_ids: set[str]) -> list[str]:
            with self._changed:
                self.cancels += 1
                self._credits += 1
                self._changed.notify_all()
            return await cancel_tasks(task_ids)

        monkeypatch.setattr(DecodeBatch, "_emit_and_retire", watched)
        monkeypatch.setattr(gradio.routes, "cancel_tasks", counted)

    def hold(self, step: int, block: bool = True, until_cancel: bool = False) -> None:
        """Hold the next answer to reach `step` (one answer at a time); with `block=False` only note its
        stop event (`wait_held`) and let it run. `until_cancel`: once stopped, it still waits for Gradio's
        `/cancel`, so the stream cannot end before the page has asked for it (a race otherwise: a page that sees
        the stream end first has nothing left to cancel)."""
        with self._changed:
            self.held, self._hold_at, self._credits, self._block = None, step, 0, block
            self._until_cancel = until_cancel

    def _released(self) -> bool:
        return self.held.is_set() and (not self._until_cancel or self.cancels > 0)

    def wait_cancels(self, n: int) -> None:
        """Until Gradio has received `n` cancel requests in all."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.cancels >= n, timeout=30), "Gradio got no cancel"

    def wait_held(self) -> threading.Event:
        """The held answer's stop event, once it has reached the step."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.held is not None, timeout=60), (
                "no answer reached the step"
            )
            return self.held

    def wait_left(self, stop: threading.Event) -> None:
        """Until the answer has left the batch (its last step has run)."""
        with self._changed:
            assert self._changed.wait_for(lambda: stop in self.left, timeout=120), "the answer never ended"

    def release(self) -> None:
        """Stop holding (a failing test must not leave the worker waiting)."""
        with self._changed:
            self.timed_out = True
            self._changed.notify_all()


@pytest.fixture
def decoding(monkeypatch) -> Iterator[Decoding]:
    watch = Decoding(monkeypatch)
    yield watch
    watch.release()


# -- the handlers, called directly ----------------------------------------------------------------------


def test_the_app_has_its_named_endpoints(app) -> None:
    # exactly the documented ones: the UI's own events (chat, stop, clear, clicks) are private
    assert list(app.get_api_info()["named_endpoints"]) == ["/ask", "/ask_stream", "/attention", "/similarity"]


def test_chat_streams_growing_text_equal_to_the_models_answer(demo, model, uploads) -> None:
    outs, shown, history = chat(demo, "What shape is in the image?", IMAGE, max_new_tokens=12)
    answers = [out[0][-1]["content"] for out in outs[1:]]
    assert len(answers) >= 3  # it streamed, piece by piece
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(answers, answers[1:], strict=False))
    assert answers[-1] == model.ask(IMAGE, "What shape is in the image?", max_new_tokens=12)
    # the first yield shows the question with a copy of its image, and clears the input boxes
    first = outs[0][0][-1]
    assert first["role"] == "user" and first["content"][1] == "What shape is in the image?"
    copy = Path(first["content"][0]["path"])
    assert copy.parent.parent == uploads and Image.open(copy).size == (64, 64)  # Gradio's folder cleans it
    assert outs[0][2:] == ("", None)
    assert [m["role"] for m in shown] == ["user", "assistant"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[-1]["content"] == answers[-1]
    assert Path(IMAGE).is_file()  # an example is never deleted


def test_a_second_image_joins_mid_conversation_and_the_first_stays(demo, model) -> None:
    red, blue = str(EXAMPLES[0].path), str(EXAMPLES[1].path)
    _, shown, history = chat(demo, "What shape is this?", red)
    _, shown, history = chat(demo, "And this one?", blue, shown, history)
    _, shown, history = chat(demo, "Which one is red?", None, shown, history)
    images = [p["image"] for m in history if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]  # fmt: skip
    assert len(images) == 2 and len(history) == 6
    batch = model.prepare([history[:-1]], for_generation=True)
    assert int((batch.input_ids == model.image_token_id).sum()) == 2 * model.tokens_per_image
    # the streamed answer is the model's answer to the whole conversation, both images included
    assert history[-1]["content"] == model.generate([history[:-1]], max_new_tokens=8)[0]


def test_bad_input_gets_a_friendly_message_and_the_chat_goes_on(demo, model, uploads, tmp_path) -> None:
    def reply(question: str, image: str | None) -> str:
        outs, shown, history = chat(demo, question, image)
        assert len(outs) == 1 and history == []  # nothing reached the model
        return shown[-1]["content"]

    assert "Type a question" in reply("", None)
    assert "Type a question" in reply("   ", IMAGE)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(IMAGE).read_bytes()[:100])
    for path, why in [
        (not_image, "not an image"),
        (empty, "empty"),
        (truncated, "truncated"),
        (tmp_path / "missing.png", "no such file"),
    ]:
        message = reply("What is it?", str(path))
        assert message.startswith("⚠️ I couldn't use that image") and why in message
        assert "Traceback" not in message
        if path.exists():  # the same file as an upload: the same message, and the upload is deleted
            uploaded = upload(uploads, path)
            assert reply("What is it?", {"path": uploaded, "orig_name": path.name}) == message
            assert not Path(uploaded).exists()
    huge = Handlers(model, max_image_pixels=64 * 63)  # the 64x64 example is one pixel row too big
    outs = list(huge.chat("What is it?", IMAGE, [], [], **QUICK))
    huge.close()
    assert (
        "is 64x64 = 4,096 pixels, more than the limit of 4,032" in outs[-1][0][-1]["content"]
        and "at most 4,032 pixels." in outs[-1][0][-1]["content"]
    )
    # and the app still answers
    _, shown, _ = chat(demo, "What is it?", IMAGE)
    assert shown[-1]["role"] == "assistant" and shown[-1]["content"]


def test_uploads_are_deleted_once_read(demo, model, uploads) -> None:
    # a chat turn: the upload (Gradio's record of it, as the page sends it) is gone, the answer is the same
    uploaded = upload(uploads, IMAGE)
    _, shown, history = chat(demo, "What shape is in the image?", {"path": uploaded, "url": None})
    assert not Path(uploaded).exists()
    assert history[-1]["content"] == model.ask(IMAGE, "What shape is in the image?", **QUICK)
    assert Path(shown[0]["content"][0]["path"]).is_file()  # the chat's own small copy stays
    # a big one: the model's history keeps it at KEEP_SIDE, the chat shows a copy at SHOWN_SIDE
    big = uploads / "big.png"
    Image.new("RGB", (1500, 1000), "red").save(big)
    _, shown, history = chat(demo, "And this?", upload(uploads, big))
    kept = next(p["image"] for p in history[0]["content"] if p["type"] == "image")
    assert kept.size[0] == KEEP_SIDE and abs(kept.size[1] - KEEP_SIDE * 2 / 3) < 1
    shown_size = Image.open(shown[0]["content"][0]["path"]).size
    assert shown_size[0] == SHOWN_SIDE and abs(shown_size[1] - SHOWN_SIDE * 2 / 3) < 1
    # the API handlers: answers, pictures and refusals all delete theirs
    for call in [
        lambda image: demo.ask(image, "What is it?", **QUICK),
        lambda image: list(demo.ask_stream(image, "What is it?", **QUICK)),
        demo.attention,
        lambda image: demo.similarity(image, 1, 2),
        demo.encoder_view,
    ]:
        uploaded = upload(uploads, PHOTO)
        assert call(uploaded) is not None and not Path(uploaded).exists()
    uploaded = upload(uploads, IMAGE)
    with pytest.raises(gr.Error, match="ask a question"):
        demo.ask(uploaded, "  ")
    assert not Path(uploaded).exists()
    uploaded = upload(uploads, __file__, "notes.png")
    with pytest.raises(gr.Error, match="couldn't use that image"):
        demo.ask(uploaded, "What is it?")
    assert not Path(uploaded).exists()
    # the same file sent twice at once shares one upload path: the second reader still gets the image
    uploaded = upload(uploads, IMAGE)
    first, second = demo.uploads.open(uploaded), demo.uploads.open(uploaded)
    assert first.size == second.size == (64, 64) and not Path(uploaded).exists()


def test_a_shared_upload_is_remembered_through_a_full_queue_of_others(tmp_path) -> None:
    """Two users sending the same file share Gradio's path and the first reader deletes it: the second still
    gets the image after as many other uploads as the queue admits have been read in between."""
    from demo.app import QUEUE_SIZE
    from demo.handlers import Uploads

    uploads = Uploads(tmp_path)
    shared = tmp_path / "shared.png"
    Image.new("RGB", (8, 8), (200, 20, 20)).save(shared)
    first = uploads.open(str(shared))
    assert not shared.exists()
    for i in range(QUEUE_SIZE - 1):  # everyone else in the queue sends another picture
        other = tmp_path / f"other{i}.png"
        Image.new("RGB", (8, 8), (i, 0, 0)).save(other)
        uploads.open(str(other))
    assert list(uploads.open(str(shared)).getdata()) == list(first.getdata())


def test_api_handlers_raise_the_friendly_message(demo) -> None:
    with pytest.raises(gr.Error, match="ask a question"):
        demo.ask(IMAGE, "  ")
    with pytest.raises(gr.Error, match="couldn't use that image"):
        demo.ask(__file__, "What is it?")
    assert demo.ask(None, "What is the capital of France?", **QUICK)  # no image is fine


def test_long_conversations_lose_their_oldest_turns_with_a_notice(demo, model) -> None:
    assert model.context_length == 512  # the tiny LM's
    filler = "Tell me more about the shapes and their colours please. " * 8  # ~100 tokens
    history = []
    for i in range(4):
        history += [user(f"{i}: {filler}", [Image.open(IMAGE)] if i == 0 else []), {"role": "assistant", "content": filler}]  # fmt: skip
    assert model.prompt_length(history) > 512 - 8
    outs, shown, kept = chat(demo, "Last question?", None, [], history)
    notice = shown[-2]["content"]
    assert notice.startswith("ⓘ") and "512-token context" in notice and "(with 1 image)" in notice
    assert kept[-2]["content"][-1]["text"] == "Last question?"  # the newest turn is kept
    assert len(kept) < len(history) + 2 and kept[0]["role"] == "user"  # whole exchanges dropped, oldest first
    assert not kept[0]["content"][-1]["text"].startswith("0:")
    assert model.prompt_length(kept[:-1]) <= 512 - 8
    assert kept[-1]["role"] == "assistant"
    # one message longer than the whole context: a friendly refusal
    outs, shown, kept = chat(demo, filler * 6, None)
    assert "Please shorten it" in shown[-1]["content"] and kept == []


def test_settings_are_clamped_to_the_context(demo) -> None:
    assert demo.settings(10_000, -1, 5) == Settings(256, 0.0, 1.0)  # half the tiny 512-token context
    assert demo.settings(None, None, None) == Settings()
    assert demo.settings(0, 0.7, 0.0) == Settings(1, 0.7, 0.01)


def test_stop_and_a_closed_stream_end_the_answer_within_a_step(demo, model, decoding) -> None:
    ids = model.tokenizer(model.generate([[user(STORY)]], max_new_tokens=8)[0])["input_ids"]
    assert len(ids) >= 6  # unstopped, the answer goes on: a no-op stop could not pass
    # the Stop button: the answer, held after its 2nd step, takes at most one more
    decoding.hold(2)
    turn = demo.chat(STORY, None, [], [], **LONG, request=session("s1"))
    next(turn), next(turn)  # the question shown, then the first piece
    stop = decoding.wait_held()
    assert demo._stops["s1"] is stop
    demo.stop(session("s1"))
    rest = list(turn)
    decoding.wait_left(stop)
    assert not decoding.timed_out, "Stop did not reach the generator"
    assert decoding.steps[stop] <= 3 and decoding.after_stop[stop] <= 1
    assert len(rest) <= 2  # the piece of step 2, then that of the last step
    assert "s1" not in demo._stops
    # closing the generator (Gradio's cancel, a closed tab) stops the answer too
    decoding.hold(2)
    turn = demo.chat(STORY, None, [], [], **LONG, request=session("s2"))
    next(turn), next(turn)
    stop = decoding.wait_held()
    turn.close()
    decoding.wait_left(stop)
    assert not decoding.timed_out, "closing the stream did not reach the generator"
    assert decoding.steps[stop] <= 3 and decoding.after_stop[stop] <= 1
    assert "s2" not in demo._stops
    # a new answer in a session stops that session's previous one
    decoding.hold(2)
    first = demo.stream([user(STORY)], Settings(256), session="s3")
    next(first)
    stop = decoding.wait_held()
    second = demo.stream([user("Another one.")], Settings(4), session="s3")
    next(second)
    decoding.wait_left(stop)
    assert decoding.steps[stop] <= 3 and decoding.after_stop[stop] <= 1
    assert len(list(first)) <= 2
    list(second)
    assert demo.ask(None, "Still there?", **QUICK)


def test_attention_and_similarity_pictures(demo, model) -> None:
    attention = demo.attention(PHOTO)
    assert attention.size == (384, 384) and attention.mode == "RGB"
    picture, note, sim_picture, sim_note, kept = demo.encoder_view(PHOTO)
    assert picture.size == sim_picture.size == (384, 384)
    assert "pooling head" in note and "row 3, column 3" in sim_note  # the centre patch of the 4x4 grid
    assert kept.size == Image.open(PHOTO).size  # the tab's state: clicks and zero-shot read it, not the file
    # a click at pixel (x=383, y=0) of the 384-px picture is the top-right patch
    click = gr.SelectData(None, {"index": [383, 0], "value": None})
    sim_picture, sim_note = demo.similarity_click(kept, click)
    assert sim_picture.size == (384, 384) and "row 1, column 4" in sim_note
    sim = patch_similarity(model.vision, model.processor([Image.open(PHOTO).convert("RGB")]), 0, 3)
    assert sim.shape == model.config.grid and sim[0, 3] == pytest.approx(1.0, abs=1e-5)
    assert sim.max() <= 1 + 1e-5
    assert demo.similarity(PHOTO, 0, 3).size == (384, 384)
    assert demo.similarity(kept, 0, 3).size == (384, 384)
    assert demo.encoder_view(__file__)[1].startswith("⚠️")
    assert demo.attention(None) is None and demo.similarity_click(None, click) == (None, "")


def test_zero_shot_appears_with_a_text_tower(model, tokenizer) -> None:
    from vlm.siglip_model import SiglipConfig, SiglipModel
    from vlm.siglip_text import SiglipTextConfig

    text = SiglipTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_size=VISION.hidden_size,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)).eval()
    handlers = Handlers(model, dual_encoder=(siglip, tokenizer))
    app = build_app(handlers)
    assert "/zero_shot" in app.get_api_info()["named_endpoints"]
    scores = handlers.zero_shot(PHOTO, "a cat, a dog,  , a cat")
    assert list(scores) == ["a cat", "a dog"] and all(0 <= p <= 1 for p in scores.values())
    # `vlm.zeroshot`'s scores, with its templates
    expected = zero_shot(siglip, tokenizer, [PHOTO], ["a cat", "a dog"])[0].tolist()
    assert list(scores.values()) == pytest.approx(expected, abs=1e-6)
    assert handlers.zero_shot(Image.open(PHOTO), "a cat") == pytest.approx({"a cat": expected[0]}, abs=1e-6)
    with pytest.raises(gr.Error, match="comma-separated"):
        handlers.zero_shot(PHOTO, " , ")
    with pytest.raises(gr.Error, match="no SigLIP text tower"):
        Handlers(model).zero_shot(PHOTO, "a cat")
    handlers.close()


def test_model_description(tmp_path) -> None:
    assert describe_model(None).trained_on == UNTRAINED
    assert "no model card" in describe_model(tmp_path).trained_on
    (tmp_path / "README.md").write_text(
        "---\ndatasets:\n- easy-vqa\nlicense: apache-2.0\n---\n# tiny-vlm-easyvqa\n\nLoRA on easy-VQA.\n"
    )
    info = describe_model(tmp_path)
    assert (info.name, info.trained_on) == ("tiny-vlm-easyvqa", "easy-vqa")
    assert "LoRA on easy-VQA." in info.card


def test_the_demo_script_passes_its_flags_to_launch(monkeypatch) -> None:
    """`python demo/app.py` is an entry point users run; check its wiring without serving anything."""
    script = Path(__file__).resolve().parents[1] / "demo" / "app.py"
    spec = importlib.util.spec_from_file_location("demo_app", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "demo_app", module)  # as Python registers a script (dataclasses need it)
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "m", "--port", "7999", "--siglip", "s"])
    module.main()
    assert calls == [(("m",), dict(host="127.0.0.1", port=7999, share=False, siglip_dir="s"))]


def test_vlm_demo_runs_the_demo_through_its_entry_point(monkeypatch, capsys) -> None:
    """`vlm demo` finds `demo.app:main` by its entry point (the library never imports demo/) and hands it
    its flags; without gradio it says what to install."""
    from vlm.cli import main

    calls = []
    monkeypatch.setattr(demo_app, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["demo", "--port", "7999", "--share"]) == 0
    assert calls == [((None,), dict(host="127.0.0.1", port=7999, share=True, siglip_dir=None))]
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--siglip" in capsys.readouterr().out  # the demo's own help

    class NoGradio:
        def load(self):
            raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [NoGradio()])
    assert main(["demo"]) == 2
    assert "pip install 'vlm[demo]'" in capsys.readouterr().err
    assert main(["zeroshot", "x.jpg", "--labels", "a", "--port", "1"]) == 2  # only the demo takes other flags
    assert "--port" in capsys.readouterr().err


# -- the served app, through gradio_client -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tries: int = 5, **kwargs) -> tuple[gr.Blocks, str]:
    """`launch(..., block=False)` on a port the OS says is free. Another process can take it before Gradio
    binds it (Gradio then raises OSError), so a clash is retried on a new port."""
    for attempt in range(tries):
        try:
            return launch(port=free_port(), block=False, **kwargs)
        except OSError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def served(model):
    app, url = serve(model=model, max_file_size="1mb")
    assert url.startswith("http://127.0.0.1:")
    yield url
    app.close()


def test_api_answers_an_image_question(served, model) -> None:
    client = Client(served, verbose=False)
    answer = client.predict(handle_file(IMAGE), "What shape is in the image?", 8, 0.0, 1.0, api_name="/ask")
    assert answer and answer == model.ask(IMAGE, "What shape is in the image?", max_new_tokens=8)
    job = client.submit(
        handle_file(IMAGE), "What shape is in the image?", 8, 0.0, 1.0, api_name="/ask_stream"
    )
    pieces = list(job)
    assert len(pieces) >= 2 and pieces[-1] == answer and job.outputs()[-1] == answer
    overlay = client.predict(handle_file(PHOTO), api_name="/attention")
    assert Image.open(overlay).size == (384, 384)
    overlay = client.predict(handle_file(PHOTO), 1, 2, api_name="/similarity")
    assert Image.open(overlay).size == (384, 384)
    with pytest.raises(Exception, match="couldn't use that image"):
        client.predict(handle_file(__file__), "What is it?", 8, 0.0, 1.0, api_name="/ask")
    assert client.predict(None, "Still there?", 4, 0.0, 1.0, api_name="/ask")  # alive after a bad input


def test_cancelling_a_streamed_answer_ends_it_within_a_step(served, decoding) -> None:
    """`job.cancel()` posts Gradio's `/cancel`; Gradio closes the handler's generator, which stops the answer."""
    client = Client(served, verbose=False)
    decoding.hold(2)
    job = client.submit(None, STORY, 256, 0.0, 1.0, api_name="/ask_stream")
    stop = decoding.wait_held()
    cancelling = threading.Thread(target=job.cancel)  # returns once Gradio has closed the generator
    cancelling.start()
    decoding.wait_left(stop)
    cancelling.join(timeout=60)
    assert decoding.cancels == 1 and not decoding.timed_out, "the cancel did not reach the generator"
    # one step frees the thread Gradio waits for, then the answer's stop ends it at the next
    assert decoding.steps[stop] <= 4 and decoding.after_stop[stop] <= 1
    assert client.predict(None, "Still there?", 4, 0.0, 1.0, api_name="/ask")


def test_the_served_app_deletes_uploads_once_read(served, tmp_path) -> None:
    client = Client(served, verbose=False)

    def left(name: str) -> list[Path]:  # the upload's file(s) in Gradio's folder
        return list(Path(get_upload_folder()).rglob(name))

    for name, call in [
        (f"{uuid.uuid4().hex}.png", lambda f: client.predict(f, "What is it?", 4, 0.0, 1.0, api_name="/ask")),
        (f"{uuid.uuid4().hex}.png", lambda f: client.predict(f, api_name="/attention")),
    ]:
        image = tmp_path / name
        shutil.copy(IMAGE, image)
        assert call(handle_file(str(image)))
        assert left(name) == []
    refused = tmp_path / f"{uuid.uuid4().hex}.png"
    refused.write_text("not a picture")
    with pytest.raises(Exception, match="couldn't use that image"):
        client.predict(handle_file(str(refused)), "What is it?", 4, 0.0, 1.0, api_name="/ask")
    assert left(refused.name) == []
    # the handlers take Gradio's upload record unprocessed, so Gradio must still refuse other paths
    local = tmp_path / "local.png"
    shutil.copy(IMAGE, local)
    data = [{"path": str(local), "meta": {"_type": "gradio.FileData"}}, "What is it?", 4, 0.0, 1.0]
    event = httpx.post(f"{served}gradio_api/call/ask", json={"data": data}).json()["event_id"]
    assert "event: error" in httpx.get(f"{served}gradio_api/call/ask/{event}", timeout=60).text
    assert local.is_file()


def test_uploads_over_the_size_cap_are_refused(served, tmp_path) -> None:
    big = tmp_path / "big.png"
    Image.effect_noise((800, 800), 64).convert("RGB").save(big)  # noise does not compress: ~1.9 MB
    assert big.stat().st_size > 1_000_000
    client = Client(served, verbose=False)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # gradio_client reads the cap
        client.predict(handle_file(str(big)), "What is it?", 4, 0.0, 1.0, api_name="/ask")
    # and the server enforces it on a raw upload (a browser, or any other client)
    response = httpx.post(f"{served}gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert response.status_code == 413
    assert client.predict(handle_file(IMAGE), "Still there?", 4, 0.0, 1.0, api_name="/ask")


def test_twenty_concurrent_clients_each_get_their_own_answer(served, model) -> None:
    asks = [
        (str(EXAMPLES[i % len(EXAMPLES)].path), f"Question {i}: {EXAMPLES[i % len(EXAMPLES)].question}")
        for i in range(20)
    ]
    expected = [model.ask(image, question, max_new_tokens=8) for image, question in asks]
    assert len(set(expected)) >= 18  # nearly all different: answers swapped between clients would show
    start = threading.Barrier(20)

    def one(ask: tuple[str, str]) -> str:
        client = Client(served, verbose=False)
        start.wait()  # all 20 ask at once
        return client.predict(handle_file(ask[0]), ask[1], 8, 0.0, 1.0, api_name="/ask")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, asks))
    assert answers == expected
    again = Client(served, verbose=False).predict(
        handle_file(IMAGE), "And now?", 8, 0.0, 1.0, api_name="/ask"
    )
    assert again == model.ask(IMAGE, "And now?", max_new_tokens=8)


def assert_shipped_as_drawn(example, drawn: Image.Image) -> None:
    """The example's file holds the pixels the generator draws (so it is the test image it names)."""
    with Image.open(example.path) as shipped:
        assert list(shipped.convert("RGB").getdata()) == list(drawn.convert("RGB").getdata()), example.file


def test_the_scene_examples_are_test_scenes_with_their_own_answers() -> None:
    """Each generated example is test scene <i> as the generator draws it (so never trained on), and its
    question and answer are one the scene itself asks, of the skill its file names."""
    from needs import missing

    from vlm.data import scenes

    if notes := scenes.picture_pool()[2]:
        missing(f"the scenes' pictures ({'; '.join(notes)})")
    shown = [e for e in EXAMPLES if e.file.startswith("scene_")]
    skills = {Path(e.file).stem.split("_")[2] for e in shown}
    assert skills == set(scenes.SKILLS)  # every skill the scenes teach has its example
    for example in shown:
        index, skill = Path(example.file).stem.split("_")[1:]
        scene = scenes.generate(scenes.scene_seed("test", int(index)))
        assert_shipped_as_drawn(example, scenes.render(scene))
        asked = {(p, qa.answer, qa.skill) for qa in scenes.candidates(scene) for p in qa.phrasings}
        assert (example.question, example.answer, skill) in asked, example


def test_the_sort_of_clevr_examples_are_test_images_with_their_own_answers() -> None:
    """One relational and one non-relational example, each a Sort-of-CLEVR test image as the generator draws
    it, with a question and answer of that kind the image itself asks."""
    from vlm.data import sort_of_clevr

    shown = [e for e in EXAMPLES if e.file.startswith("sort-of-clevr_")]
    assert {Path(e.file).stem.split("_")[2] for e in shown} == {"relational", "non-relational"}
    for example in shown:
        index, kind = Path(example.file).stem.split("_")[1:]
        image = sort_of_clevr.generate(sort_of_clevr.scene_seed("test", int(index)))
        assert_shipped_as_drawn(example, sort_of_clevr.render(image))
        assert example.group == next(e.group for e in EXAMPLES if e.file.startswith("scene_")), example.file
        asked = {(qa.question, qa.answer, qa.kind) for qa in sort_of_clevr.questions(image)}
        assert (example.question, example.answer, kind) in asked, example


def test_the_shipped_model_and_encoder_name_shape_and_colour_through_the_api(default_model) -> None:
    info = describe_model(DEFAULT_MODEL_DIR)
    assert info.trained_on != UNTRAINED
    encoder = load_dual_encoder(DEFAULT_SIGLIP_DIR)
    app, url = serve(model=default_model, model_info=info, dual_encoder=encoder)
    shapes = ZERO_SHOT_LABELS  # what the Encoder tab starts with: every easy-VQA shape
    assert sorted(shapes.split(", ")) == sorted(f"a {s}" for s in EASY_VQA_SHAPES)
    colours = ", ".join(f"a {c} shape" for c in EASY_VQA_COLORS)
    try:
        client = Client(url, verbose=False)
        for example in EXAMPLES:
            if not example.file.startswith("easyvqa_"):
                continue
            colour, shape = Path(example.file).stem.split("_")[2:]  # easyvqa_<id>_<colour>_<shape>.png
            image = handle_file(str(example.path))
            answer = client.predict(image, "What shape is in the image?", 16, 0.0, 1.0, api_name="/ask")
            assert shape in answer.lower(), (example.file, answer)
            answer = client.predict(image, "What color is the shape?", 16, 0.0, 1.0, api_name="/ask")
            assert colour in answer.lower(), (example.file, answer)
            # the zero-shot box's pick (its label, the top score) with the shipped dual encoder
            assert client.predict(image, shapes, api_name="/zero_shot")["label"] == f"a {shape}", example.file
            picked = client.predict(image, colours, api_name="/zero_shot")["label"]
            assert picked == f"a {colour} shape", example.file
    finally:
        app.close()


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--port", "-1"], "argument --port: must be an integer in 0-65535, got '-1'"),
        (["--port", "99999"], "argument --port: must be an integer in 0-65535, got '99999'"),
        (["--siglip", "{tmp}/missing"], "no checkpoint folder at {tmp}/missing"),
        (["--siglip", str(DEFAULT_MODEL_DIR)], f"{DEFAULT_MODEL_DIR} is a vlm model folder"),
    ],
    ids=["port-negative", "port-too-big", "siglip-missing", "siglip-a-vlm"],
)
def test_a_bad_port_or_siglip_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, flags, named):
    """Gradio refuses a port past 65535 (OverflowError) and `load_dual_encoder` a bad folder only after the
    model has loaded; both are named first, in one line, as `vlm demo` and `python demo/app.py` print it."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(demo_app, "load_model", refuse)
    try:
        code = demo_app.main([flag.format(tmp=tmp_path) for flag in flags])
    except SystemExit as done:  # argparse's refusal of a flag
        code = done.code
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith(f"vlm demo: error: {named.format(tmp=tmp_path)}")
    assert len(captured.err.strip().splitlines()) == 1 and "Loading the model" not in captured.out
    with pytest.raises(ValueError, match="port must be an integer in 0-65535, got 70000"):
        launch(port=70_000, block=False)  # the API too, before the model loads
