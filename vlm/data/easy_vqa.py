"""easy-VQA (PyPI `easy-vqa`, Victor Zhou): 64 x 64 images of one coloured shape, with questions about them.

One module for both uses: `load_easy_vqa_rows` gives its questions as VQA rows (38,575 train / 9,673 test, for
fine-tuning and evaluation), `build` its images as caption pairs (3,971 train / 988 test, "a blue circle",
for pretraining a tower). easy-VQA has no captions, so the caption is synthesised from what the answers say
about each image (`easy_vqa_attributes`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import datasets
from datasets import Features, Value

from vlm.data import common

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
_VERSION = 1
FEATURES = Features({**common.PAIR_FEATURES, "shape": Value("string"), "color": Value("string")})


def _package() -> ModuleType:
    try:
        import easy_vqa
    except ImportError:
        raise common.SourceUnavailable(
            "easy_vqa is not installed; install it with: pip install easy-vqa"
        ) from None
    return easy_vqa


def _questions(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, {image id: PNG path}) of one official split."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has the splits 'train' and 'test', not {split!r}")
    package = _package()
    questions, answers, image_ids = getattr(package, f"get_{split}_questions")()
    return questions, answers, image_ids, getattr(package, f"get_{split}_image_paths")()


def easy_vqa_type(answer: str) -> str:
    """easy-VQA's question type, read from its answer: "yes/no", "shape" or "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def load_easy_vqa_rows(split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """easy-VQA's questions as VQA rows: image (the PNG's path), question, answers (one), question_type.

    With `limit`, a fixed random sample of that many questions (by `seed`), in set order."""
    questions, answers, image_ids, paths = _questions(split)
    return [
        {
            "image": paths[image_ids[i]],
            "question": questions[i],
            "answers": [answers[i]],
            "question_type": easy_vqa_type(answers[i]),
        }
        for i in common.random_sample(range(len(questions)), limit, seed)
    ]


def build(
    split: common.Split = "train", size: int | None = 64, limit: int | None = None, *, cache: bool = True
) -> datasets.Dataset:
    """easy-VQA's images (4,000 train / 1,000 test) captioned "a blue circle", resized to `size`.

    The caption names the image's shape and colour when its questions tell both, else the one they tell
    ("a circle", "a blue shape"); the ~1% of images whose questions tell neither are skipped. Columns: image,
    text, source, shape, color ("" when unknown)."""
    items = []
    for name in common.official_splits(split):
        questions, answers, image_ids, paths = _questions(name)
        attributes = easy_vqa_attributes(questions, answers, image_ids)
        for i in sorted(paths):
            shape, color = attributes.get(i, ("", ""))
            text = easy_vqa_caption(shape, color)
            items.append(
                {"split": name, "id": i, "path": paths[i], "text": text, "shape": shape, "color": color}
            )
    items = common.hash_sample(items, lambda item: f"{item['split']}:{item['id']}", limit)
    return common.build_rows("easy-vqa", items, _read, FEATURES, version=_VERSION, cache=cache, size=size)


def easy_vqa_attributes(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[str, str]]:
    """{image id: (shape, colour)} deduced from easy-VQA's questions and answers; "" where not deducible.

    Each image holds one shape of one colour. "what color is the circle?" -> "blue" gives both; "is there a
    red shape?" -> "yes" gives the colour, and "is there not a circle?" -> "yes" rules a shape out: with
    all shapes but one ruled out, the last one is it. Contradicting answers raise `ValueError`."""
    vocabulary = set(EASY_VQA_SHAPES) | set(EASY_VQA_COLORS)
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        named = set(re.findall(r"[a-z]+", question.lower())) & vocabulary
        if answer in vocabulary:  # "what is the blue shape?" -> "circle": both words describe the image
            present.setdefault(image, set()).update(named | {answer})
        elif answer in ("yes", "no"):
            negated = " not " in f" {question} " or question.startswith("is no ")
            side = present if (answer == "yes") != negated else absent
            side.setdefault(image, set()).update(named)
    result = {}
    for image in set(present) | set(absent):
        yes, no = present.get(image, set()), absent.get(image, set())
        if yes & no:
            raise ValueError(
                f"easy-VQA image {image}: answers contradict each other about {sorted(yes & no)}"
            )
        attributes = []
        for options in (EASY_VQA_SHAPES, EASY_VQA_COLORS):
            known = yes & set(options) or (set(options) - no if len(set(options) - no) == 1 else set())
            if len(known) > 1:
                raise ValueError(f"easy-VQA image {image}: answers name several of {sorted(known)}")
            attributes.append(next(iter(known), ""))
        result[image] = (attributes[0], attributes[1])
    return result


def easy_vqa_caption(shape: str, color: str) -> str:
    """("circle", "blue") -> "a blue circle"; one unknown -> "a circle" / "a blue shape"; both -> ""."""
    if not shape and not color:
        return ""
    return f"a {color} {shape or 'shape'}" if color else f"a {shape}"


def _read(item: dict[str, Any], size: int | None) -> dict[str, Any]:
    ref = f"{item['split']} image {item['id']}"
    if not item["text"]:
        raise common.Skip("questions tell neither shape nor colour", ref)
    return {**item, "image": common.read_image(item["path"], ref, size), "source": "easy-vqa"}
