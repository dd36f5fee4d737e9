"""Rows as chat: `to_conversation` turns a VQA row or an image–caption pair into the messages fine-tuning
learns from, where only the assistant's answer is learned.

A VQA row holds image, question, answers (one, or several annotators' answers as in VQAv2) and an optional
question_type ("shape" / "color" / "yes/no" for easy-VQA; free text elsewhere): `VQA_FEATURES` as a
`datasets.Dataset`, or plain dicts with image paths (`load_easy_vqa_rows`, `load_jsonl_rows`).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import datasets
from datasets import Features, Value
from datasets import Image as ImageFeature

from vlm.conversation import Message, user

VQA_FEATURES = Features(
    {
        "image": ImageFeature(),
        "question": Value("string"),
        "answers": datasets.List(Value("string")),
        "question_type": Value("string"),
    }
)
CAPTION_PROMPTS = (
    "Describe the image in one sentence.",
    "What is in this picture?",
    "Write a short caption for this image.",
)


def to_conversation(row: dict[str, Any], rng: random.Random | None = None) -> list[Message]:
    """A VQA row (question + answers) or a caption pair (text) -> [user(image + prompt), assistant(answer)].

    VQA learns the most common answer (ties broken by first seen); a caption pair gets one of a few prompts.
    The image is passed on as the row holds it: a path, bytes, a PIL image, or an undecoded
    `datasets.Image` cell (`undecoded`), which becomes its bytes or path, for `load_image` to read."""
    image = row["image"]
    if isinstance(image, dict):  # {"bytes": ..., "path": ...}: encoded bytes when there are any
        image = image.get("bytes") or image.get("path")
    if "question" in row:
        answer = Counter(row["answers"]).most_common(1)[0][0]
        prompt = row["question"]
    else:
        answer = row["text"]
        prompt = (rng or random).choice(CAPTION_PROMPTS)
    return [user(prompt, [image]), {"role": "assistant", "content": answer}]
