"""Conversations -> token ids with image placeholders, and labels that teach only the assistant's turns.

A conversation is a list of messages in the format transformers' multimodal chat templates use:

    [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": "A cat."}]

`content` is a string or a list of parts; an image part carries the image (path, bytes or PIL image). The
LM's own chat template renders the turns (so any instruction-tuned LM works unchanged); each image becomes
exactly `tokens_per_image` copies of the image placeholder token, later replaced by projected patch
embeddings (`VisionLanguageModel.embed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


def user(text: str, images: Sequence[ImageSource] = ()) -> Message:
    """A user message: the images first (as LLaVA and SmolVLM place them), then the text."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def flatten(messages: Sequence[Message], placeholder: str) -> tuple[list[dict[str, str]], list[ImageSource]]:
    """Structured content -> one string per message, each image written as `placeholder`; images in order."""
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
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(utf8_text(str(part.get("text", "")), f"message {i} text"))
            elif kind == "image":
                if part.get("image") is None:
                    raise ValueError(f"message {i}: an image part needs its image under the key 'image'")
                if role != "user":
                    raise ValueError(f"message {i}: images belong in user turns, not {role!r} ones")
                images.append(part["image"])
                pieces.append(placeholder)
            else:
                raise ValueError(f"message {i}: unknown content part {part!r}")
        flat.append({"role": role, "content": "\n".join(pieces)})
    return flat, images


def encode(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    image_token: str,
    tokens_per_image: int,
    add_generation_prompt: bool = False,
    with_labels: bool = False,
    max_length: int | None = None,
) -> Encoded:
    """Render and tokenise one conversation.

    Labels: the tokens of each assistant turn (its text and the template's end-of-turn marker, so the model
    learns to stop) keep their ids; system and user turns, image tokens and the template's scaffolding get
    IGNORE_INDEX. The spans are found by rendering each prefix of the conversation, which relies on the
    template rendering a prefix as a prefix of the whole (true of ChatML and the common templates; checked)."""
    flat, images = flatten(messages, image_token * tokens_per_image)
    if not any(m["role"] != "system" and m["content"].strip() for m in flat) and not images:
        raise ValueError("the conversation is empty: ask something, or give an image")

    def ids(turns: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
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
            prompt, turn = ids(flat[:i], True), ids(flat[: i + 1], False)
            if input_ids[: len(prompt)] != prompt or input_ids[: len(turn)] != turn:
                raise ValueError("this chat template does not render a conversation's prefix as its prefix")
            labels[len(prompt) : len(turn)] = input_ids[len(prompt) : len(turn)]
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
