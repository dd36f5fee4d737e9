"""Conversations -> token ids with image placeholders, and labels that teach only the assistant's turns.

A conversation is a list of messages in the format transformers' multimodal chat templates use:

    [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": "A cat."}]

`content` is a string or a list of parts; an image part carries the image (path, bytes or PIL image). The
model's chat template renders the turns: an LM's own text template (the parts of a message joined into one
string, each image as the image token), or a VLM processor's template that places typed parts itself
(SmolVLM's, llava-hf's: `ImagePrompt.typed_parts`). Then each image token the template wrote becomes the
image's run of placeholders (`ImagePrompt.text`), later replaced by projected patch embeddings
(`VisionLanguageModel.embed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from vlm.checks import utf8_text
from vlm.processing import ImageSource

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and so every HF LM) skips
Message = dict[str, Any]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | None  # IGNORE_INDEX everywhere but the assistant's tokens; None when not asked
    images: list[ImageSource] = field(default_factory=list)  # in the order their placeholders appear


# nanoVLM's tile and global-image tokens (its VLMConfig.vlm_extra_tokens r1c1..r8c8, global_image_token)
NANOVLM_TILE, NANOVLM_GLOBAL = "<row_{row}_col_{col}>", "<|global_image|>"


@dataclass(frozen=True)
class ImagePrompt:
    """How an image is written among a conversation's tokens.

    `plain` (LLaVA): `tokens_per_image` image tokens per tile. `idefics3` (Idefics3, SmolVLM): each tile's tokens
    after a marker, `<fake_token_around_image><row_r_col_c>` for a tile of a split image (a newline after each row
    of tiles) and `<fake_token_around_image><global-img>` for the whole image, closed by
    `<fake_token_around_image>` — the layout of transformers' `Idefics3Processor`, which those models were trained
    on. `nanovlm`: nanoVLM's `get_image_string` (data/processors.py): `<image: i>` before each image when a
    conversation has several, `<|global_image|>` and its tokens first when split images carry a global tile
    (`global_image`; all a one-tile image gets), then `<row_r_col_c>` and its tokens for each tile.

    `joiner` joins a message's parts (images and texts) into the one string a text template reads: a newline, or
    nothing for nanoVLM, which writes the image string directly before the question."""

    image_token: str
    tokens_per_image: int  # per tile
    layout: Literal["plain", "idefics3", "nanovlm"] = "plain"
    typed_parts: bool = False  # the chat template renders typed content parts (a VLM processor's template)
    joiner: str = "\n"
    # a split image has a global tile (`vlm.processing.ImageProcessing.global_image`)
    global_image: bool = True

    def text(self, grid: tuple[int, int] = (0, 0), index: int = 0, count: int = 1) -> str:
        """The image's tokens as text, for an image cut into `grid` (rows, cols) tiles ((0, 0): not cut), the
        `index`-th of the `count` images of its conversation."""
        run = self.image_token * self.tokens_per_image
        rows, cols = grid
        if self.layout == "plain":  # one run per tile, the global one included
            return run if grid == (0, 0) else run * (rows * cols + (self.global_image and grid != (1, 1)))
        if self.layout == "nanovlm":
            rows, cols = max(rows, 1), max(cols, 1)  # (0, 0), one tile, is nanoVLM's 1x1 grid
            text = f"<image: {index}>" if count > 1 else ""
            if self.global_image:
                text += NANOVLM_GLOBAL + run
                if (rows, cols) == (1, 1):
                    return text
            tiles = (
                NANOVLM_TILE.format(row=r + 1, col=c + 1) + run for r in range(rows) for c in range(cols)
            )
            return text + "".join(tiles)
        around, whole = "<fake_token_around_image>", f"<fake_token_around_image><global-img>{run}"
        if rows == cols == 0:
            return f"{whole}{around}"
        tiles = "".join(
            "".join(f"{around}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return f"{tiles}\n{whole}{around}"


def user(text: str, images: Sequence[ImageSource] = ()) -> Message:
    """A user message: the images first (as LLaVA and SmolVLM place them), then the text."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def flatten(
    messages: Sequence[Message], marker: str, typed: bool = False, joiner: str = "\n"
) -> tuple[list[dict[str, Any]], list[ImageSource]]:
    """Structured content -> what a chat template reads, and the images in order. `typed`: each message's parts
    as typed parts without the images (`{"type": "image"}`), for a template that places them; else one string
    per message, the parts joined by `joiner` and each image written as `marker`."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    flat, images = [], []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if isinstance(content, str):
            flat.append({"role": role, "content": utf8_text(content, f"message {i}")})
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"message {i}: content must be a string or a list of parts, got {type(content).__name__}"
            )
        pieces: list[dict[str, str]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(
                    {"type": "text", "text": utf8_text(str(part.get("text", "")), f"message {i} text")}
                )
            elif kind == "image":
                if part.get("image") is None:
                    raise ValueError(f"message {i}: an image part needs its image under the key 'image'")
                if role != "user":
                    raise ValueError(f"message {i}: images belong in user turns, not {role!r} ones")
                images.append(part["image"])
                pieces.append({"type": "image"})
            else:
                raise ValueError(f"message {i}: unknown content part {part!r}")
        joined = joiner.join(marker if p["type"] == "image" else p["text"] for p in pieces)
        flat.append({"role": role, "content": pieces if typed else joined})
    return flat, images


def _has_text(message: dict[str, Any]) -> bool:
    content = message["content"]
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] == "text" and p["text"].strip() for p in content)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    prompt: ImagePrompt,
    grid: Callable[[ImageSource], tuple[int, int]] | None = None,
    add_generation_prompt: bool = False,
    with_labels: bool = False,
    max_length: int | None = None,
) -> Encoded:
    """Render and tokenise one conversation. `grid` gives each image's tile grid, called once per image in
    order (None: every image is one tile, as without image splitting).

    Labels: the tokens of each assistant turn (its text and the template's end-of-turn marker, so the model
    learns to stop) keep their ids; system and user turns, image tokens and the template's scaffolding get
    IGNORE_INDEX. The spans are found by rendering each prefix of the conversation, which relies on the
    template rendering a prefix as a prefix of the whole (true of ChatML and the common templates; checked)."""
    marker = prompt.image_token
    flat, images = flatten(messages, marker, prompt.typed_parts, prompt.joiner)
    if not any(m["role"] != "system" and _has_text(m) for m in flat) and not images:
        raise ValueError("the conversation is empty: ask something, or give an image")
    image_texts = [
        prompt.text(grid(image) if grid is not None else (0, 0), k, len(images))
        for k, image in enumerate(images)
    ]
    # images in the first n messages, n = 0 .. len(messages)
    shown_by = [0]
    for message in messages:
        content = message["content"]
        shown_by.append(
            shown_by[-1] + (0 if isinstance(content, str) else sum(p["type"] == "image" for p in content))
        )

    def ids(turns: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        # The template wrote one image token per image so far; each becomes that image's run of tokens.
        pieces = text.split(marker)
        shown = shown_by[len(turns)]
        if len(pieces) - 1 != shown:
            raise ValueError(
                f"the conversation's text holds the image token {marker!r} itself ({len(pieces) - 1} found for "
                f"{shown} images): it is reserved for marking where images go"
            )
        text = pieces[0] + "".join(image_texts[k] + piece for k, piece in enumerate(pieces[1:]))
        # The template already wrote any BOS/special tokens it wants; do not let the tokenizer add more.
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = ids(flat, add_generation_prompt)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(f"the conversation is {len(input_ids)} tokens, over the limit of {max_length}")
    labels = None
    if with_labels:
        labels = [IGNORE_INDEX] * len(input_ids)
        for i, message in enumerate(flat):
            if message["role"] != "assistant":
                continue
            prompt_ids, turn = ids(flat[:i], True), ids(flat[: i + 1], False)
            if input_ids[: len(prompt_ids)] != prompt_ids or input_ids[: len(turn)] != turn:
                raise ValueError("this chat template does not render a conversation's prefix as its prefix")
            labels[len(prompt_ids) : len(turn)] = input_ids[len(prompt_ids) : len(turn)]
    return Encoded(input_ids, labels, images)


def pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """(B, max_len) tensor; left padding for generation (new tokens follow each prompt directly), right
    padding for training."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, s in enumerate(sequences):
        if s:
            if side == "left":
                out[row, width - len(s) :] = torch.tensor(s)
            else:
                out[row, : len(s)] = torch.tensor(s)
    return out
