"""Visual question answering and captioning rows for fine-tuning, as Hugging Face `datasets`.

Every VQA loader returns a `datasets.Dataset` with the columns

    image        datasets.Image()    decoded lazily (easy-VQA rows point at the package's PNG files)
    question     string
    answers      list of strings     one (easy-VQA) or several annotators' answers (VQAv2-style)
    answer_type  string              "shape" / "color" / "yes/no" for easy-VQA; free text elsewhere

and `to_conversation` turns a VQA row or an image–caption pair (`vlm.data.pairs`) into chat messages in which
only the assistant's answer is learned. Bad rows (missing image file, empty question, no answer, malformed
JSON) are counted and skipped with one summary line, never fatal.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
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
        "answer_type": Value("string"),
    }
)
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPTS = (
    "Describe the image in one sentence.",
    "What is in this picture?",
    "Write a short caption for this image.",
)


def easy_vqa_answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def build_easy_vqa_questions(
    split: str = "train", limit: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """The easy-VQA questions (PyPI `easy-vqa`): 38,575 train / 9,673 test, one answer each.

    With `limit`, a seeded random sample of that many questions (the same sample every time)."""
    try:
        import easy_vqa
    except ImportError as err:
        raise RuntimeError(
            "easy-VQA needs the `easy-vqa` package (`pip install easy-vqa`, or `make setup`)"
        ) from err
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    order = list(range(len(questions)))
    if limit is not None:
        order = sorted(random.Random(seed).sample(order, min(limit, len(order))))
    rows = {
        "image": [paths[image_ids[i]] for i in order],
        "question": [questions[i] for i in order],
        "answers": [[answers[i]] for i in order],
        "answer_type": [easy_vqa_answer_type(answers[i]) for i in order],
    }
    return datasets.Dataset.from_dict(rows, features=VQA_FEATURES)


def _answers(value: Any) -> list[str]:
    """A string, a list of strings, or VQAv2's list of {"answer": ...} dicts -> non-empty answer strings."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    out = [str(a.get("answer", "")) if isinstance(a, dict) else str(a) for a in value]
    return [a.strip() for a in out if a and a.strip()]


def _vqa_rows(
    records: Iterable[dict[str, Any]], root: Path | None, keys: tuple[str, str, str], name: str
) -> datasets.Dataset:
    image_key, question_key, answers_key = keys
    rows: dict[str, list[Any]] = {"image": [], "question": [], "answers": [], "answer_type": []}
    skipped: Counter[str] = Counter()
    total = 0
    for record in records:
        total += 1
        if record is None:
            skipped["malformed line"] += 1
            continue
        image, question = record.get(image_key), str(record.get(question_key) or "").strip()
        answers = _answers(record.get(answers_key, record.get("answer")))
        if isinstance(image, str) and root is not None and not Path(image).is_absolute():
            image = str(root / image)
        if image is None or (isinstance(image, str) and not Path(image).is_file()):
            skipped["missing image"] += 1
        elif not question:
            skipped["empty question"] += 1
        elif not answers:
            skipped["no answer"] += 1
        else:
            rows["image"].append(image)
            rows["question"].append(question)
            rows["answers"].append(answers)
            rows["answer_type"].append(str(record.get("answer_type") or record.get("question_type") or ""))
    if skipped:
        detail = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        print(f"{name}: skipped {sum(skipped.values())} of {total:,} rows: {detail}")
    return datasets.Dataset.from_dict(rows, features=VQA_FEATURES)


def from_jsonl_vqa(
    path: str | Path, image_key: str = "image", question_key: str = "question", answers_key: str = "answers"
) -> datasets.Dataset:
    """A JSONL of {"image": path (relative to the file's folder, or absolute), "question": ..., "answers":
    [...] (or "answer": "...")}."""
    path = Path(path)

    def records() -> Iterable[dict[str, Any] | None]:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield record if isinstance(record, dict) else None

    return _vqa_rows(records(), path.parent, (image_key, question_key, answers_key), path.name)


def from_hf_vqa(
    dataset: str | datasets.Dataset,
    split: str = "train",
    image_column: str = "image",
    question_column: str = "question",
    answers_column: str = "answers",
    **load_kwargs: Any,
) -> datasets.Dataset:
    """Any Hugging Face VQA dataset (VQAv2-style `answers` as strings or {"answer": ...} dicts)."""
    if isinstance(dataset, str):
        dataset = datasets.load_dataset(dataset, split=split, **load_kwargs)
    for column in (image_column, question_column, answers_column):
        if column not in dataset.column_names:
            raise ValueError(f"the dataset has no column {column!r}; it has {dataset.column_names}")
    images = dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
    records = (
        {"image": _image_value(img), "question": q, "answers": a}
        for img, q, a in zip(images, dataset[question_column], dataset[answers_column], strict=True)
    )
    return _vqa_rows(records, None, ("image", "question", "answers"), "hf-vqa")


def _image_value(value: dict[str, Any]) -> Any:
    """datasets' undecoded image {"bytes", "path"} -> what the Image feature accepts back."""
    return value if value.get("bytes") else value.get("path")


def to_conversation(row: dict[str, Any], rng: random.Random | None = None) -> list[Message]:
    """A VQA row (question + answers) or a caption pair (text) -> [user(image + prompt), assistant(answer)].

    VQA learns the most common answer (ties broken by first seen); a caption pair gets one of a few prompts."""
    image = row["image"]
    if "question" in row:
        answer = Counter(row["answers"]).most_common(1)[0][0]
        prompt = row["question"]
    else:
        answer = row["text"]
        prompt = (rng or random).choice(CAPTION_PROMPTS)
    return [user(prompt, [image]), {"role": "assistant", "content": answer}]
