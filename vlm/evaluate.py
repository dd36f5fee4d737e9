"""Evaluate a `VisionLanguageModel` on VQA (accuracy), captioning (BLEU-4, CIDEr-D) and chat (the last answer
of each conversation) by greedy generation.

    rows -> prompts (the question, or a fixed captioning prompt, as one user turn with the image)
         -> `VisionLanguageModel.generate_answers` (batched greedy with a shared prompt prefix and cached
            image embeddings) -> metrics (vlm/metrics.py) -> `EvalResult` (+ JSONL)

VQA answers are a word or two, so generation stops after `max_new_tokens` = 8 by default (the LM's own EOS
ends a batch earlier when every row has answered); optionally bf16 autocast for an fp32 model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm.generation import progress_bar
from vlm.metrics import (
    GroupScore,
    answer_counts,
    breakdown,
    caption_scores,
    exact_match,
    mean,
    vqa_accuracy,
)
from vlm.model import VisionLanguageModel
from vlm.processing import ImageSource
from vlm.weights import atomic_file, check_output_file

DEFAULT_CAPTION_PROMPT = "Describe the image in one sentence."
VQA_TYPE_KEYS = ("question_type", "answer_type")


@dataclass
class EvalResult:
    """What an evaluation measured. `predictions` holds one record per row, in the rows' order."""

    task: str  # "vqa" or "caption"
    metrics: dict[str, float]  # {"accuracy": ...} or {"bleu4": ..., "cider": ...}
    by_type: dict[str, dict[str, GroupScore]]  # type key -> type -> (mean, count)
    predictions: list[dict[str, Any]] = field(repr=False)
    seconds: float  # generation and scoring, model loading excluded

    @property
    def num_examples(self) -> int:
        return len(self.predictions)

    @property
    def examples_per_second(self) -> float:
        return self.num_examples / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict[str, float]:
        """Flat numbers for a metrics log: the metrics, "<type key>/<type>" means, and the speed."""
        out = dict(self.metrics)
        for key, groups in self.by_type.items():
            out |= {f"{key}/{kind}": group.mean for kind, group in groups.items()}
        return out | {"examples": float(self.num_examples), "examples_per_second": self.examples_per_second}

    def report(self) -> str:
        """Human-readable lines: the metrics, then one line per type with its count; for VQA, each question
        type's line also names its commonest prediction beside its commonest true answer (`answer_spread`)."""
        head = ", ".join(f"{name} {value:.4f}" for name, value in self.metrics.items())
        lines = [
            f"{self.task}: {head} on {self.num_examples} examples "
            f"({self.seconds:.1f} s, {self.examples_per_second:.1f}/s)"
        ]
        spread = self.answer_spread() if self.task == "vqa" else {}
        for key, groups in self.by_type.items():
            for kind, group in groups.items():
                line = f"  {key}={kind}: {group.mean:.4f} ({group.count})"
                if key == "question_type" and kind in spread:
                    (said, said_share), (true, true_share) = spread[kind]
                    line += f"; says {said!r} {said_share:.0%} of the time"
                    line += f", the commonest answer {true!r} {true_share:.0%}"
                lines.append(line)
        return "\n".join(lines)

    def answer_spread(self) -> dict[str, tuple[tuple[str, float], tuple[str, float]]]:
        """Per question type: (the commonest prediction, its share) and (the commonest first true answer, its
        share), both normalised as scored. A model that answers from the question's prior says one answer far
        more often than the data has it ("1" to most counts, "yes" to a word that is seldom there)."""
        asked = [r for r in self.predictions if r.get("question_type") is not None and r.get("answers")]
        said = answer_counts((str(r["question_type"]), str(r["prediction"])) for r in asked)
        true = answer_counts((str(r["question_type"]), str(r["answers"][0])) for r in asked)
        out = {}
        for kind, counts in said.items():
            n = sum(counts.values())
            (top, k), (answer, m) = counts.most_common(1)[0], true[kind].most_common(1)[0]
            out[kind] = ((top, k / n), (answer, m / n))
        return out


# -- VQA ------------------------------------------------------------------------------------------------------


def evaluate_vqa(
    model: VisionLanguageModel,
    rows: Iterable[dict[str, Any]],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    progress: bool = True,
    predictions_path: str | Path | None = None,
    bf16: bool = False,
    type_keys: Sequence[str] = VQA_TYPE_KEYS,
) -> EvalResult:
    """VQA accuracy of greedy answers: rows of {"image", "question", "answers": [str, ...]} and optional
    type keys ("question_type", "answer_type"), each broken down separately.

    The score of a row is `vlm.metrics.vqa_accuracy` (exact match for one answer, the VQAv2 soft score for
    many); `metrics["accuracy"]` is their mean. Each prediction record holds the question, answers,
    prediction, its score, `correct` (the normalised prediction equals one of the normalised answers) and
    the row's types; with `predictions_path` they are written there as JSON lines (a path that cannot be
    written is refused before any generation)."""
    if predictions_path is not None:
        check_output_file(predictions_path, "the predictions file")
    start = time.perf_counter()
    rows = _check_rows(rows, ("image", "question", "answers"), "answers", type_keys)
    predictions = model.generate_answers(
        [str(row["question"]) for row in rows],
        [row["image"] for row in rows],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        bf16=bf16,
        progress=progress,
        desc="vqa",
    )
    records = []
    for row, prediction in zip(rows, predictions, strict=True):
        answers = [str(a) for a in row["answers"]]
        records.append(
            {
                **_image_field(row["image"]),
                "question": row["question"],
                "answers": answers,
                "prediction": prediction,
                "score": vqa_accuracy(prediction, answers),
                "correct": bool(exact_match(prediction, answers)),
                **{key: row[key] for key in type_keys if row.get(key) is not None},
            }
        )
    metrics = {"accuracy": mean(r["score"] for r in records)}
    return _finish("vqa", records, metrics, type_keys, "score", start, predictions_path)


# -- captioning -------------------------------------------------------------------------------------------------


def evaluate_captions(
    model: VisionLanguageModel,
    rows: Iterable[dict[str, Any]],
    prompt: str = DEFAULT_CAPTION_PROMPT,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool = True,
    predictions_path: str | Path | None = None,
    bf16: bool = False,
    type_keys: Sequence[str] = (),
) -> EvalResult:
    """BLEU-4 and CIDEr-D of greedy captions: rows of {"image", "captions": [str, ...]}, each captioned
    with `prompt` as the user turn. Both are corpus scores (see `vlm.metrics.caption_scores`); the
    per-type breakdown (by the row keys in `type_keys`) averages per-image CIDEr-D. `predictions_path` as in
    `evaluate_vqa`."""
    if predictions_path is not None:
        check_output_file(predictions_path, "the predictions file")
    start = time.perf_counter()
    rows = _check_rows(rows, ("image", "captions"), "captions", type_keys)
    predictions = model.generate_answers(
        [prompt] * len(rows),
        [row["image"] for row in rows],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        bf16=bf16,
        progress=progress,
        desc="caption",
    )
    references = [[str(c) for c in row["captions"]] for row in rows]
    scores = caption_scores(predictions, references)
    records = [
        {
            **_image_field(row["image"]),
            "captions": refs,
            "prediction": prediction,
            "bleu4": bleu,
            "cider": cider,
            **{key: row[key] for key in type_keys if row.get(key) is not None},
        }
        for row, refs, prediction, bleu, cider in zip(
            rows, references, predictions, scores.bleu4_per_item, scores.cider_per_item, strict=True
        )
    ]
    metrics = {"bleu4": scores.bleu4, "cider": scores.cider}
    return _finish("caption", records, metrics, type_keys, "cider", start, predictions_path)


# -- chat -----------------------------------------------------------------------------------------------------


def evaluate_chat(
    model: VisionLanguageModel,
    rows: Iterable[dict[str, Any]],
    batch_size: int = 32,
    max_new_tokens: int = 64,
    progress: bool = True,
    predictions_path: str | Path | None = None,
    bf16: bool = False,
    type_keys: Sequence[str] = (),
) -> EvalResult:
    """The last assistant turn of each conversation, generated greedily after the turns before it: rows of
    {"messages" (ending with a user turn), "reference"} (`vlm.data.named.Rows.eval_rows` of a chat source).
    Metrics: `accuracy` (the normalised answer equals the reference, as VQA's exact match), BLEU-4 and
    CIDEr-D against the reference. `predictions_path` as in `evaluate_vqa`."""
    if predictions_path is not None:
        check_output_file(predictions_path, "the predictions file")
    start = time.perf_counter()
    rows = _check_rows(rows, ("messages", "reference"), "messages", type_keys, image_key=None)
    model.generation_kwargs(max_new_tokens=max_new_tokens)  # validates before any work
    predictions = [""] * len(rows)
    # Rows with and without images apart (the adapter may be off for text: `adapter_on_text`), each group
    # longest first so a batch holds conversations of about one length.
    groups = (
        [i for i, r in enumerate(rows) if _has_image(r["messages"])],
        [i for i, r in enumerate(rows) if not _has_image(r["messages"])],
    )
    bar = progress_bar(len(rows), "chat", progress)
    autocast = torch.autocast(model.lm.device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        for group in groups:
            order = sorted(group, key=lambda i: -len(json.dumps(rows[i]["messages"], default=str)))
            for first in range(0, len(order), batch_size):
                batch = order[first : first + batch_size]
                with autocast:
                    texts = model.generate(
                        [rows[i]["messages"] for i in batch], max_new_tokens=max_new_tokens
                    )
                for i, text in zip(batch, texts, strict=True):
                    predictions[i] = text.strip()
                bar.update(len(batch))
    finally:
        bar.close()
    references = [[str(row["reference"])] for row in rows]
    scores = caption_scores(predictions, references)
    records = [
        {
            "messages": _printable(row["messages"]),
            "reference": refs[0],
            "prediction": prediction,
            "correct": float(exact_match(prediction, refs)),
            "bleu4": bleu,
            "cider": cider,
            **{key: row[key] for key in type_keys if row.get(key) is not None},
        }
        for row, refs, prediction, bleu, cider in zip(
            rows, references, predictions, scores.bleu4_per_item, scores.cider_per_item, strict=True
        )
    ]
    metrics = {"accuracy": mean(r["correct"] for r in records), "bleu4": scores.bleu4, "cider": scores.cider}
    return _finish("chat", records, metrics, type_keys, "correct", start, predictions_path)


def _has_image(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image" for p in m["content"])
        for m in messages
    )


def _printable(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for the predictions file: an image part keeps its path; in-memory images become "<image>"."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image", **_image_field(p["image"])} if p["type"] == "image" else p for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


# Evaluation by data kind (`vlm.data.named`): what `vlm eval` and fine-tuning's `data.eval` run.
EVALUATORS = {"vqa": evaluate_vqa, "caption": evaluate_captions, "chat": evaluate_chat}


# -- shared ---------------------------------------------------------------------------------------------------


def _check_rows(
    rows: Iterable[dict[str, Any]],
    required: Sequence[str],
    list_key: str,
    type_keys: Sequence[str],
    image_key: str | None = "image",
) -> list[dict[str, Any]]:
    """The rows as plain dicts of the keys used here, with clear errors for missing or malformed values.

    A PIL image opened from a file (as `datasets` hands out its Image feature) is replaced by that file's
    path: it is then loaded once per distinct file, and the decoded pixels of every row need not be held."""
    slim = []
    for n, row in enumerate(rows):
        if missing := [key for key in required if row.get(key) is None]:
            raise ValueError(
                f"row {n} lacks {', '.join(missing)} (has {', '.join(sorted(row)) or 'nothing'})"
            )
        if isinstance(row[list_key], str) or not row[list_key]:
            raise ValueError(f"row {n}: {list_key!r} must be a non-empty list of strings")
        kept = {key: row[key] for key in (*required, *type_keys) if row.get(key) is not None}
        if image_key is not None:
            image = row[image_key]
            if isinstance(image, Image.Image) and getattr(image, "filename", ""):
                image = image.filename
            kept[image_key] = image
        slim.append(kept)
    if not slim:
        raise ValueError("nothing to evaluate: no rows")
    return slim


def _image_field(image: ImageSource) -> dict[str, str]:
    """The image's path for the predictions file; in-memory images are not written."""
    return {"image": str(image)} if isinstance(image, (str, Path)) else {}


def _finish(
    task: str,
    records: list[dict[str, Any]],
    metrics: dict[str, float],
    type_keys: Sequence[str],
    score_key: str,
    start: float,
    predictions_path: str | Path | None,
) -> EvalResult:
    by_type = {}
    for key in type_keys:
        if groups := breakdown([r[score_key] for r in records], [r.get(key) for r in records]):
            by_type[key] = groups
    if predictions_path is not None:
        write_jsonl(predictions_path, records)
    return EvalResult(task, metrics, by_type, records, time.perf_counter() - start)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line (UTF-8, non-ASCII kept readable); parent folders are created. The file appears
    whole or not at all (written under a temporary name, then renamed)."""
    path = Path(path)
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "EvalResult",
    "EVALUATORS",
    "evaluate_captions",
    "evaluate_chat",
    "evaluate_vqa",
    "write_jsonl",
]
