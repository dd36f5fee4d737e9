"""The Gradio demo (`vlm/app.py`) around a tiny random VLM (SmolLM2's real tokenizer).

The handlers called directly (streaming, multi-image chat, bad input, context truncation, stop, encoder
pictures, zero-shot), then the served app driven through `gradio_client` (an answer, the upload cap, 20
concurrent clients). The browser test is `test_app_browser.py`."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from tiny import VISION, build

from vlm.app import (
    EXAMPLES,
    UNTRAINED,
    Demo,
    Settings,
    build_app,
    describe_model,
    launch,
    load_model,
)
from vlm.conversation import user

IMAGE = str(EXAMPLES[0].path)  # easy-VQA test image 0: a red triangle, 64x64
PHOTO = str(next(e.path for e in EXAMPLES if e.file == "chelsea.jpg"))
QUICK = dict(max_new_tokens=8, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def tokenizer(parts):
    return parts[1]


@pytest.fixture(scope="module")
def model(parts):
    return build(parts)


@pytest.fixture(scope="module")
def app(model) -> gr.Blocks:
    return build_app(model)


@pytest.fixture(scope="module")
def demo(app) -> Demo:
    return app.handlers


def chat(demo: Demo, question: str, image: str | None = None, display=None, history=None, **settings):
    """Run one chat turn to the end: (all yields, final chatbot messages, final history)."""
    outs = list(demo.chat(question, image, display or [], history or [], **(QUICK | settings)))
    return outs, outs[-1][0], outs[-1][1]


# -- the handlers, called directly ----------------------------------------------------------------------


def test_the_app_has_its_named_endpoints(app) -> None:
    # exactly the documented ones: the UI's own events (chat, stop, clear, clicks) are private
    assert list(app.get_api_info()["named_endpoints"]) == ["/ask", "/ask_stream", "/attention", "/similarity"]


def test_chat_streams_growing_text_equal_to_the_models_answer(demo, model) -> None:
    outs, shown, history = chat(demo, "What shape is in the image?", IMAGE, max_new_tokens=12)
    answers = [out[0][-1]["content"] for out in outs[1:]]
    assert len(answers) >= 3  # it streamed, piece by piece
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(answers, answers[1:], strict=False))
    assert answers[-1] == model.ask(IMAGE, "What shape is in the image?", max_new_tokens=12)
    # the first yield shows the question (with its image) and clears the input boxes
    assert outs[0][0][-1] == {"role": "user", "content": [{"path": IMAGE}, "What shape is in the image?"]}
    assert outs[0][2:] == ("", None)
    assert [m["role"] for m in shown] == ["user", "assistant"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[-1]["content"] == answers[-1]


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


def test_bad_input_gets_a_friendly_message_and_the_chat_goes_on(demo, model, tmp_path) -> None:
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
    huge = Demo(model, max_image_pixels=64 * 63)  # the 64x64 example is one pixel row too big
    outs = list(huge.chat("What is it?", IMAGE, [], [], **QUICK))
    assert (
        "is 64x64 = 4,096 pixels, more than the limit of 4,032" in outs[-1][0][-1]["content"]
        and "at most 4,032 pixels." in outs[-1][0][-1]["content"]
    )
    # and the app still answers
    _, shown, _ = chat(demo, "What is it?", IMAGE)
    assert shown[-1]["role"] == "assistant" and shown[-1]["content"]


def test_api_handlers_raise_the_friendly_message(demo) -> None:
    with pytest.raises(gr.Error, match="ask a question"):
        demo.ask(IMAGE, "  ")
    with pytest.raises(gr.Error, match="couldn't use that image"):
        demo.ask(__file__, "What is it?")
    assert demo.ask(None, "What is the capital of France?", **QUICK)  # no image is fine


def test_long_conversations_lose_their_oldest_turns_with_a_notice(demo, model) -> None:
    assert demo.context_length == 512  # the tiny LM's
    filler = "Tell me more about the shapes and their colours please. " * 8  # ~100 tokens
    history = []
    for i in range(4):
        history += [user(f"{i}: {filler}", [Image.open(IMAGE)] if i == 0 else []), {"role": "assistant", "content": filler}]  # fmt: skip
    assert demo.prompt_length(history) > 512 - 8
    outs, shown, kept = chat(demo, "Last question?", None, [], history)
    notice = shown[-2]["content"]
    assert notice.startswith("ⓘ") and "512-token context" in notice and "(with 1 image)" in notice
    assert kept[-2]["content"][-1]["text"] == "Last question?"  # the newest turn is kept
    assert len(kept) < len(history) + 2 and kept[0]["role"] == "user"  # whole exchanges dropped, oldest first
    assert not kept[0]["content"][-1]["text"].startswith("0:")
    assert demo.prompt_length(kept[:-1]) <= 512 - 8
    assert kept[-1]["role"] == "assistant"
    # one message longer than the whole context: a friendly refusal
    outs, shown, kept = chat(demo, filler * 6, None)
    assert "Please shorten it" in shown[-1]["content"] and kept == []


def test_settings_are_clamped_to_the_context(demo) -> None:
    assert demo.settings(10_000, -1, 5) == Settings(256, 0.0, 1.0)  # half the tiny 512-token context
    assert demo.settings(None, None, None) == Settings()
    assert demo.settings(0, 0.7, 0.0) == Settings(1, 0.7, 0.01)


def test_stopping_frees_the_model_within_a_token(demo, model) -> None:
    messages = [user("Tell me a long story.")]
    stream = demo.stream(messages, Settings(max_new_tokens=256), session="s1")
    next(stream)
    assert demo._model_lock.locked()
    demo.stop(SimpleNamespace(session_hash="s1"))  # the stop button: its session's generation ends
    rest = list(stream)
    assert len(rest) < 20
    assert demo._model_lock.acquire(timeout=1.0)  # free again
    demo._model_lock.release()
    # closing the generator (Gradio's cancel, a closed tab) stops the worker too
    stream = demo.stream(messages, Settings(max_new_tokens=256))
    next(stream)
    stream.close()
    assert demo._model_lock.acquire(timeout=1.0)
    demo._model_lock.release()


def test_attention_and_similarity_pictures(demo, model) -> None:
    attention = demo.attention(PHOTO)
    assert attention.size == (384, 384) and attention.mode == "RGB"
    picture, note, sim_picture, sim_note = demo.encoder_view(PHOTO)
    assert picture.size == sim_picture.size == (384, 384)
    assert "pooling head" in note and "row 3, column 3" in sim_note  # the centre patch of the 4x4 grid
    # a click at pixel (x=383, y=0) of the 384-px picture is the top-right patch
    click = gr.SelectData(None, {"index": [383, 0], "value": None})
    sim_picture, sim_note = demo.similarity_click(PHOTO, click)
    assert sim_picture.size == (384, 384) and "row 1, column 4" in sim_note
    sim = demo.patch_similarity(Image.open(PHOTO).convert("RGB"), 0, 3)
    assert sim.shape == model.config.grid and sim[0, 3] == pytest.approx(1.0, abs=1e-5)
    assert sim.max() <= 1 + 1e-5
    assert demo.similarity(PHOTO, 0, 3).size == (384, 384)
    assert demo.encoder_view(__file__)[1].startswith("⚠️")
    assert demo.attention(None) is None


def test_zero_shot_appears_with_a_text_tower(model, tokenizer) -> None:
    from vlm.siglip_model import SiglipConfig, SiglipModel
    from vlm.siglip_text import SiglipTextConfig

    text = SiglipTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_size=VISION.hidden_size,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)).eval()
    app = build_app(model, siglip_model=siglip, siglip_tokenizer=tokenizer)
    assert "/zero_shot" in app.get_api_info()["named_endpoints"]
    scores = app.handlers.zero_shot(PHOTO, "a cat, a dog,  , a cat")
    assert list(scores) == ["a cat", "a dog"] and all(0 <= p <= 1 for p in scores.values())
    with pytest.raises(gr.Error, match="comma-separated"):
        app.handlers.zero_shot(PHOTO, " , ")
    with pytest.raises(ValueError, match="tokenizer"):
        Demo(model, siglip_model=siglip)


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
    spec.loader.exec_module(module)
    calls = []
    monkeypatch.setattr(module, "launch", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(sys, "argv", ["app.py", "--model", "m", "--port", "7999", "--siglip", "s"])
    module.main()
    assert calls == [(("m",), dict(host="127.0.0.1", port=7999, share=False, siglip_dir="s"))]


# -- the served app, through gradio_client -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(model):
    app, url = launch(model=model, port=free_port(), block=False, max_file_size="1mb")
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


def test_twenty_concurrent_clients_all_get_answers(served) -> None:
    questions = [f"Question {i}: what shape is in the image?" for i in range(20)]
    start = threading.Barrier(20)

    def one(question: str) -> str:
        client = Client(served, verbose=False)
        start.wait()  # all 20 ask at once
        return client.predict(handle_file(IMAGE), question, 8, 0.0, 1.0, api_name="/ask")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, questions))
    assert len(answers) == 20 and all(isinstance(a, str) and a for a in answers)
    again = Client(served, verbose=False).predict(
        handle_file(IMAGE), "And now?", 8, 0.0, 1.0, api_name="/ask"
    )
    assert again


def test_the_shipped_model_names_shape_and_colour_through_the_api() -> None:
    model, info = load_model()
    assert info.trained_on != UNTRAINED
    app, url = launch(model=model, model_info=info, port=free_port(), block=False)
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
    finally:
        app.close()
