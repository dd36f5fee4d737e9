"""The one generation engine on a tiny random VLM: the fast many-questions path, stopping, context trimming,
and batched serving — each checked against plain one-by-one `generate`."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from tiny import build, image_sources, images
from transformers import AutoTokenizer

from vlm.conversation import user
from vlm.model import Chat, ContextTooLong, VisionLanguageModel
from vlm.serving import BatchedGenerator, DecodeBatch, Request

QUESTIONS = [
    "What shape is it?",
    "What colour is the shape in this picture, if you look closely at it?",
    "Is there a circle?",
    "Does the image contain a red shape somewhere?",
    "What is it?",
]


@pytest.fixture(scope="module")
def vlm(parts) -> VisionLanguageModel:
    return build(parts)


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    """11 questions about 4 images given as a path, PIL images and bytes, several per image, of varied lengths
    (so batches are padded, reordered, and share images across batch boundaries)."""
    sources = image_sources(tmp_path)
    return [{"image": image, "question": QUESTIONS[i % len(QUESTIONS)]} for i, image in enumerate(sources)]


def one_by_one(vlm: VisionLanguageModel, rows: list[dict], max_new_tokens: int = 8) -> list[str]:
    return [vlm.ask(r["image"], r["question"], max_new_tokens=max_new_tokens) for r in rows]


# -- many single-turn questions ------------------------------------------------------------------------------


def test_generate_answers_equals_one_by_one(vlm, rows) -> None:
    expected = one_by_one(vlm, rows)
    assert len(set(expected)) >= 4  # the answers differ by image and question, so a mix-up would show
    questions, sources = [r["question"] for r in rows], [r["image"] for r in rows]
    for batch_size in (1, 4, 64):
        assert vlm.generate_answers(questions, sources, batch_size=batch_size, progress=False) == expected
    # each trick alone: no shared prefix, no image cache between batches
    assert (
        vlm.generate_answers(questions, sources, batch_size=4, share_prefix=False, progress=False) == expected
    )
    assert (
        vlm.generate_answers(questions, sources, batch_size=4, image_cache_bytes=0, progress=False)
        == expected
    )


def test_generate_answers_uses_the_system_prompt_as_generate_does(parts, rows) -> None:
    vlm = build(parts, system_prompt="Answer in one word.")
    expected = one_by_one(vlm, rows[:4])
    questions, sources = [r["question"] for r in rows[:4]], [r["image"] for r in rows[:4]]
    assert vlm.generate_answers(questions, sources, batch_size=2, progress=False) == expected


def test_generate_answers_without_images_and_longer_answers(vlm) -> None:
    prompts = ["Tell me a story.", "What is two plus two?"]
    expected = [vlm.generate([[user(p)]], max_new_tokens=12)[0] for p in prompts]
    assert vlm.generate_answers(prompts, [None, None], max_new_tokens=12, progress=False) == expected


# -- stopping --------------------------------------------------------------------------------------------------


class _Counting:
    """A streamer that counts the tokens generate produces and sets `stop` after `after` of them."""

    def __init__(self, stop: threading.Event, after: int) -> None:
        self.stop, self.after, self.tokens = stop, after, 0

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1 or value.shape[-1] == 1:  # the prompt comes first as one (1, L) tensor
            self.tokens += 1
            if self.tokens == self.after:
                self.stop.set()

    def end(self) -> None:
        pass


def test_stop_ends_generate_after_the_current_token(vlm) -> None:
    conversation = [user("Tell me a very long story about the picture.", images(1))]
    full = vlm.generate([conversation], max_new_tokens=40)[0]
    stop = threading.Event()
    counter = _Counting(stop, after=3)
    stopped = vlm.generate([conversation], streamer=counter, stop=stop, max_new_tokens=40)[0]
    assert counter.tokens <= 4  # at most the token in flight when the stop came
    assert len(vlm.tokenizer(stopped)["input_ids"]) <= 5 < len(vlm.tokenizer(full)["input_ids"])
    assert full.startswith(stopped.strip()[:5])


def test_closing_a_stream_stops_its_worker(vlm) -> None:
    stream = vlm.stream(images(1), "Tell me a very long story.", max_new_tokens=200)
    next(stream)
    stream.close()  # returns only once the generation thread has ended
    assert not [t for t in threading.enumerate() if t.name == "vlm-generate"]


# -- context ---------------------------------------------------------------------------------------------------


def test_fit_context_drops_the_oldest_exchanges_and_keeps_the_system_turn(vlm) -> None:
    system = {"role": "system", "content": "Be brief."}
    history = [system]
    for i in range(30):
        history += [
            user(f"Question {i}: what is in this image?", images(1)),
            {"role": "assistant", "content": "x" * 40},
        ]
    newest = user("And now?", images(1))
    fitted, dropped = vlm.fit_context([*history, newest], max_new_tokens=64)
    assert fitted[0] == system and fitted[-1] == newest and dropped > 0
    assert vlm.prompt_length(fitted) <= vlm.context_length - 64
    assert fitted[1:-1] == history[1 + 2 * dropped :]  # whole exchanges, oldest first
    with pytest.raises(ContextTooLong, match="tokens"):
        vlm.fit_context([user("word " * 600)], max_new_tokens=64)


def test_chat_keeps_answering_past_the_context(vlm) -> None:
    chat = Chat(vlm)
    for i in range(12):  # 12 turns of ~60 tokens + answers overflow the tiny LM's 512-token context
        answer = "".join(
            chat.send(f"Question number {i} about this picture, please?", images(1), max_new_tokens=16)
        )
        assert chat.messages[-1] == {"role": "assistant", "content": answer}
    assert chat.dropped > 0
    assert vlm.prompt_length(chat.messages[:-1]) <= vlm.context_length - 16  # the last prompt left room


# -- batched serving -------------------------------------------------------------------------------------------


def conversations() -> list[list[dict]]:
    red, blue, green = images(3)
    return [
        [user("What colour is this?", [red])],
        [user("A much longer question about two pictures, to force left padding here?", [blue, green])],
        [user("No image at all, tell me something.")],
        [user("What is it?", [green]), {"role": "assistant", "content": "A square."}, user("Sure?")],
        [user("Describe it.", [blue])],
        [
            {"role": "system", "content": "Talk like a pirate."},
            user("Hello there?", [red]),
        ],  # no shared prefix
    ]


def concurrently(engine: BatchedGenerator, convs: list, settings: list[dict]) -> list[str | None]:
    """Each conversation asked from its own thread at once; the answers in order (None: none came), and the
    engine closed."""
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        answers[i] = engine.generate(convs[i], **settings[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(convs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    engine.close()
    return [answers.get(i) for i in range(len(convs))]


def test_batched_generator_answers_concurrent_callers_as_generate_does(vlm) -> None:
    convs = conversations()
    expected = [vlm.generate([c], max_new_tokens=12)[0] for c in convs]
    assert len(set(expected)) == len(expected)  # distinct answers: a swap between callers would show
    engine = BatchedGenerator(vlm, max_batch_size=3)  # 5 callers, 3 rows at a time: some wait, then join
    assert concurrently(engine, convs, [dict(max_new_tokens=12)] * len(convs)) == expected


def test_rows_join_and_leave_a_running_batch(vlm) -> None:
    """Driven step by step: a row joins a batch mid-answer and finished rows leave; every answer is the one
    generate gives alone."""
    convs = conversations()
    lengths = [12, 3, 12, 7, 12, 9]
    expected = [vlm.generate([c], max_new_tokens=n)[0] for c, n in zip(convs, lengths, strict=True)]
    requests = [
        Request(
            vlm.prepare([c], for_generation=True), vlm.generation_kwargs(max_new_tokens=n), threading.Event()
        )
        for c, n in zip(convs, lengths, strict=True)
    ]
    batch = DecodeBatch(vlm, has_images=True)
    batch.join(requests[:2])
    batch.step()
    batch.step()
    batch.join(requests[2:4])  # joins while rows 0 and 1 are mid-answer
    sizes = []
    for _ in range(4):
        batch.step()
        sizes.append(len(batch))
    batch.join(requests[4:])
    while len(batch):
        batch.step()
    assert min(sizes) < 4  # row 1 (3 tokens) and row 3 (7) left before the others
    texts = []
    for r in requests:
        pieces = []
        while (piece := r.pieces.get_nowait()) is not _done():
            pieces.append(piece)
        texts.append("".join(pieces))
    assert texts == expected


def _done() -> object:
    from vlm import serving

    return serving._DONE


def test_a_stopped_row_leaves_at_the_next_step_and_the_others_run_on(vlm) -> None:
    convs = conversations()[:2]
    expected = vlm.generate([convs[1]], max_new_tokens=20)[0]
    requests = [
        Request(
            vlm.prepare([c], for_generation=True),
            vlm.generation_kwargs(max_new_tokens=200),
            threading.Event(),
        )
        for c in convs
    ]
    requests[1].settings["max_new_tokens"] = 20
    batch = DecodeBatch(vlm, has_images=True)
    batch.join(requests)
    batch.step()
    requests[0].stop.set()
    batch.step()  # the stopped row's last step: it leaves
    assert len(batch) == 1
    while len(batch):
        batch.step()
    pieces = [requests[0].pieces.get_nowait() for _ in range(requests[0].pieces.qsize())]
    assert pieces[-1] is _done() and len(pieces) <= 4  # 3 tokens at most, then the end
    texts = [requests[1].pieces.get_nowait() for _ in range(requests[1].pieces.qsize())]
    assert "".join(texts[:-1]) == expected

    # The same through the threaded engine: the stopped stream ends, the other answer is whole.
    engine = BatchedGenerator(vlm)
    stop = threading.Event()
    first = engine.stream(convs[0], stop=stop, max_new_tokens=200)
    next(first)
    stop.set()
    assert engine.generate(convs[1], max_new_tokens=20) == expected
    assert len(vlm.tokenizer("".join(first))["input_ids"]) < 100
    engine.close()


def test_bad_input_raises_before_anything_is_queued(vlm) -> None:
    engine = BatchedGenerator(vlm)
    with pytest.raises(ValueError, match="empty"):
        next(engine.stream([user("   ")]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(engine.stream([user("Hi")], max_new_tokens=0))
    assert engine._worker is None  # nothing reached the worker
    assert (
        engine.generate([user("Hi")], max_new_tokens=4) == vlm.generate([[user("Hi")]], max_new_tokens=4)[0]
    )
    engine.close()


def test_sampling_rows_decode_beside_greedy_ones(vlm) -> None:
    engine = BatchedGenerator(vlm)
    convs = conversations()
    torch.manual_seed(0)
    settings = [dict(temperature=0.8, top_p=0.9, top_k=20), {}, dict(repetition_penalty=1.3)]
    results = concurrently(engine, convs[:3], [dict(max_new_tokens=10, **s) for s in settings])
    assert results[1] == vlm.generate([convs[1]], max_new_tokens=10)[0]
    assert results[2] == vlm.generate([convs[2]], max_new_tokens=10, repetition_penalty=1.3)[0]
    assert isinstance(results[0], str) and results[0]


def test_pil_images_are_served(vlm, tmp_path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    engine = BatchedGenerator(vlm)
    assert engine.generate([user("What?", [str(path)])], max_new_tokens=5) == vlm.ask(
        str(path), "What?", max_new_tokens=5
    )
    engine.close()


def test_smollm2_tokenizer_fixture_is_real(smollm2_folder) -> None:
    assert AutoTokenizer.from_pretrained(smollm2_folder).eos_token == "<|im_end|>"


def test_adapter_off_for_text_rows_in_their_own_batch(parts) -> None:
    from test_lora import randomize_lora_

    from vlm.lora import LoraSettings, add_lora

    vlm = build(parts, adapter_on_text=False)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_lora_(vlm)
    convs = conversations()
    expected = [vlm.generate([c], max_new_tokens=8)[0] for c in convs]
    engine = BatchedGenerator(vlm)
    assert concurrently(engine, convs, [dict(max_new_tokens=8)] * len(convs)) == expected
