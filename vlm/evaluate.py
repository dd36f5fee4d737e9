"""Evaluate a `VisionLanguageModel` on VQA (accuracy) and captioning (BLEU-4, CIDEr-D) by greedy generation.

    rows -> prompts (the question, or a fixed captioning prompt, as one user turn with the image)
         -> `generate_answers` (fast batched greedy) -> metrics (vlm/metrics.py) -> `EvalResult` (+ JSONL)

`generate_answers` gives exactly what `model.generate([[user(prompt, [image])]])` gives row by row, faster:
- prompts are batched longest first, so a batch holds prompts of nearly one length (little left padding),
  and the answers are put back in the rows' order;
- each distinct prompt text is tokenised once (easy-VQA: ~100 distinct questions for 9,673 rows);
- the token prefix every prompt shares (the chat template's system turn and user header, 24 of ~55 tokens
  for SmolLM2) runs through the LM once; each batch starts from a copy of its key/value cache;
- each distinct image is loaded, preprocessed and run through the tower and projector once while its
  embeddings stay in a small cache (easy-VQA: ~10 questions per image), and the cached embeddings are
  spliced into the LM's input embeddings as `VisionLanguageModel.embed` does;
- VQA answers are a word or two, so generation stops after `max_new_tokens` = 8 by default (the LM's own
  EOS ends a batch earlier when every row has answered);
- `torch.inference_mode()`, and optionally bf16 autocast for an fp32 model.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm.conversation import encode, pad, user
from vlm.metrics import GroupScore, breakdown, caption_scores, exact_match, mean, vqa_accuracy
from vlm.model import VisionLanguageModel
from vlm.processing import ImageSource

DEFAULT_CAPTION_PROMPT = "Describe the image in one sentence."
VQA_TYPE_KEYS = ("question_type", "answer_type")
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


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
        """Human-readable lines: the metrics, then one line per type with its count."""
        head = ", ".join(f"{name} {value:.4f}" for name, value in self.metrics.items())
        lines = [
            f"{self.task}: {head} on {self.num_examples} examples "
            f"({self.seconds:.1f} s, {self.examples_per_second:.1f}/s)"
        ]
        for key, groups in self.by_type.items():
            lines += [f"  {key}={kind}: {group.mean:.4f} ({group.count})" for kind, group in groups.items()]
        return "\n".join(lines)


# -- fast batched greedy generation ------------------------------------------------------------------------


def generate_answers(
    model: VisionLanguageModel,
    prompts: Sequence[str],
    images: Sequence[ImageSource | None],
    batch_size: int = 64,
    max_new_tokens: int = 8,
    bf16: bool = False,
    progress: bool = True,
    image_cache_bytes: int = 1 << 30,
    share_prefix: bool = True,
    desc: str = "eval",
) -> list[str]:
    """Greedy answers to `prompts[i]` about `images[i]` (None: no image), one string each, in order.

    The same answers as `model.generate([[user(prompts[i], [images[i]])]], max_new_tokens=...)[0]` for
    each i, as batched generation gives the same as one by one: only the last bits of the arithmetic may
    differ, which can flip a greedy choice only on a near-tie (the module docstring says what is done once
    instead of per row). Images are identified by path, by the bytes they hold, or, for PIL images, by
    object identity. `image_cache_bytes` bounds the image embeddings kept between batches; `share_prefix`
    computes the prompts' common token prefix once. `bf16` runs an fp32 model under bf16 autocast (faster
    where the hardware has bf16 units; the answers may then differ from fp32 ones)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = model.generation_kwargs(max_new_tokens=max_new_tokens)  # validates max_new_tokens too
    if not prompts:
        return []
    with_image = [i for i, image in enumerate(images) if image is not None]
    if not model.config.adapter_on_text and 0 < len(with_image) < len(images):
        # The adapter is on for prompts with an image and off for those without (`adapter_on_text`), as in
        # `generate`: answer the two groups apart, each with its own shared prefix.
        answers = [""] * len(prompts)
        for group in (with_image, [i for i, image in enumerate(images) if image is None]):
            texts = generate_answers(
                model, [prompts[i] for i in group], [images[i] for i in group], batch_size, max_new_tokens,
                bf16, progress, image_cache_bytes, share_prefix, desc,
            )  # fmt: skip
            for i, text in zip(group, texts, strict=True):
                answers[i] = text
        return answers

    # Distinct images, each under a hashable key; row i's image is sources[image_of[i]] (-1: none).
    keys: dict[Any, int] = {}
    sources: list[ImageSource] = []
    image_of = []
    for image in images:
        if image is None:
            image_of.append(-1)
            continue
        key = _image_key(image)
        if key not in keys:
            keys[key] = len(sources)
            sources.append(image)
        image_of.append(keys[key])

    # Token ids of each distinct (prompt, has image) pair, rendered exactly as `model.prepare` renders them.
    # The placeholder object stands in for the image: `encode` only writes its placeholder tokens.
    token_cache: dict[tuple[str, bool], list[int]] = {}
    ids = []
    for prompt, image in zip(prompts, image_of, strict=True):
        key = (prompt, image >= 0)
        if key not in token_cache:
            message = user(prompt, [_PLACEHOLDER] if image >= 0 else [])
            token_cache[key] = encode(
                model.tokenizer,
                model.with_system_prompt([message]),
                model.config.image_token,
                model.tokens_per_image,
                add_generation_prompt=True,
            ).input_ids
        ids.append(token_cache[key])

    # Longest first: each batch holds prompts of nearly one length, and a batch that will not fit in memory
    # fails at once. Ties keep one image's rows together, so they share its cached embeddings.
    order = sorted(range(len(prompts)), key=lambda i: (-len(ids[i]), image_of[i], i))
    prefix = ids[0][: _shared_prefix_length(ids, model.image_token_id)] if share_prefix else []
    cache = _EmbeddingCache(image_cache_bytes)
    answers: list[str] = [""] * len(prompts)
    device = model.lm.device
    autocast = bf16 and next(model.lm.parameters()).dtype == torch.float32
    was_training = model.training
    model.eval()
    bar = _progress(len(prompts), desc, progress)
    try:
        with torch.inference_mode():
            # The prefix's keys and values, computed once (batch 1) and copied into every batch's cache.
            prefix_ids = torch.tensor([prefix], dtype=torch.long, device=device)
            # Mixed image/text-only sets were split above when the adapter is off for text, so the prefix
            # belongs to one side only.
            with _bf16(device, autocast), model.adapter_for(has_images=-1 not in image_of):
                prefix_cache = model.lm(input_ids=prefix_ids, use_cache=True).cache if prefix else None
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                # The tower and projector run in the model's own precision even with bf16: they cost little
                # next to the LM, and their output is cached and reused.
                image_embeds = _image_embeddings(
                    model, sources, [image_of[i] for i in rows if image_of[i] >= 0], cache
                )
                suffixes = [ids[i][len(prefix) :] for i in rows]
                with _bf16(device, autocast), model.adapter_for(image_embeds is not None):
                    texts = _generate_batch(model, prefix_ids, prefix_cache, suffixes, image_embeds, settings)
                for i, text in zip(rows, texts, strict=True):
                    answers[i] = text
                bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)
    return answers


def _bf16(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _shared_prefix_length(ids: Sequence[Sequence[int]], image_token_id: int) -> int:
    """Length of the token prefix all prompts share, up to their first image token (the image embeddings
    differ from row to row) and leaving every prompt at least one token of its own."""
    shortest = min(len(x) for x in ids)
    n = 0
    while n < shortest - 1 and ids[0][n] != image_token_id and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def _generate_batch(
    model: VisionLanguageModel,
    prefix_ids: torch.Tensor,
    prefix_cache: Any,
    suffixes: Sequence[Sequence[int]],
    image_embeds: torch.Tensor | None,
    settings: dict[str, Any],
) -> list[str]:
    """Greedy answers for one batch: the shared prefix (already in `prefix_cache`, if any), then each row's
    own tokens left-padded. The padding sits between prefix and suffix; the attention mask hides it, and the
    LM's position ids (the running count of unmasked tokens) give every real token the position it has in
    the prompt alone, so the answers do not change."""
    device = prefix_ids.device
    n = len(suffixes)
    input_ids = torch.cat(
        [prefix_ids.expand(n, -1), pad(suffixes, model.tokenizer.pad_token_id, "left").to(device)], dim=1
    )  # (B, P + max suffix)
    attention_mask = torch.cat(
        [
            torch.ones_like(prefix_ids).expand(n, -1),
            pad([[1] * len(s) for s in suffixes], 0, "left").to(device),
        ],
        dim=1,
    )
    embeds = _splice(model, input_ids, image_embeds)
    kwargs = dict(settings)
    if prefix_cache is not None:
        kwargs["cache"] = copy.deepcopy(prefix_cache)  # generate appends to the cache it is given
        kwargs["cache"].batch_repeat_interleave(n)
    # As `VisionLanguageModel.generate`: input_ids beside inputs_embeds (the LM reads only the embeddings of
    # the tokens not yet in the cache).
    out = model.lm.generate(
        input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
    )
    return model.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)


class _Placeholder:
    """Stands in for an image while prompts are tokenised (never loaded)."""


_PLACEHOLDER = _Placeholder()


def _image_key(image: ImageSource) -> tuple[str, Any]:
    if isinstance(image, (str, Path)):
        return ("path", str(image))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", bytes(image))
    if isinstance(image, Image.Image):
        # Identity, not content: hashing pixels would cost about what loading them does. The caller's list
        # keeps the object alive, so its id cannot be reused during the evaluation.
        return ("pil", id(image))
    raise TypeError(f"an image is a path, bytes or a PIL image, got {type(image).__name__}")


class _EmbeddingCache:
    """Least-recently-used image embeddings (tokens_per_image, D_lm), bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, index: int) -> torch.Tensor | None:
        if index in self.entries:
            self.entries.move_to_end(index)
            return self.entries[index]
        return None

    def put(self, index: int, embeds: torch.Tensor) -> None:
        self.entries[index] = embeds
        self.bytes += embeds.numel() * embeds.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def _image_embeddings(
    model: VisionLanguageModel, sources: Sequence[ImageSource], wanted: Sequence[int], cache: _EmbeddingCache
) -> torch.Tensor | None:
    """(len(wanted), tokens_per_image, D_lm) for the images `wanted` (indices into `sources`), encoding
    only those not cached, each once."""
    if not wanted:
        return None
    found = {i: cache.get(i) for i in dict.fromkeys(wanted)}
    if missing := [i for i, embeds in found.items() if embeds is None]:
        pixel_values = model.processor([sources[i] for i in missing]).to(model.lm.device)
        for i, embeds in zip(missing, model.encode_images(pixel_values), strict=True):
            found[i] = embeds
            cache.put(i, embeds.clone())  # a clone: a view would keep the whole batch's tensor alive
    return torch.stack([found[i] for i in wanted])


def _splice(model: VisionLanguageModel, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
    """`VisionLanguageModel.embed` with the image embeddings already computed: (B, L, D_lm)."""
    embeds = model.lm.get_input_embeddings()(input_ids)
    if images is None:
        return embeds
    is_image = input_ids == model.image_token_id  # (B, L)
    if int(is_image.sum()) != images.shape[0] * images.shape[1]:  # would be a bug here, not bad input
        raise ValueError(f"{int(is_image.sum())} image tokens for {images.shape[0]} images")
    return embeds.masked_scatter(is_image.unsqueeze(-1), images.to(embeds.dtype))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


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
    the row's types; with `predictions_path` they are written there as JSON lines."""
    start = time.perf_counter()
    rows = _check_rows(rows, ("image", "question", "answers"), "answers", type_keys)
    predictions = generate_answers(
        model,
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


def easy_vqa_type(answer: str) -> str:
    """easy-VQA's question type, read from its answer: "yes/no", "shape" or "color"."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def load_easy_vqa_rows(split: str = "test", limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """easy-VQA (the `easy-vqa` PyPI package) as VQA rows: image path, question, answers (one), and
    question_type. With `limit`, a fixed random sample of that many questions (by `seed`), in set order."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("easy-VQA is not installed: pip install easy-vqa") from None
    if split not in ("train", "test"):
        raise ValueError(f"easy-VQA has the splits 'train' and 'test', not {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()  # {image id: path}
    return [
        {
            "image": paths[image_ids[i]],
            "question": questions[i],
            "answers": [answers[i]],
            "question_type": easy_vqa_type(answers[i]),
        }
        for i in _sample(range(len(questions)), limit, seed)
    ]


def _sample(items: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """A fixed random sample of `limit` items (all of them when None or more), kept in their order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


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
    per-type breakdown (by the row keys in `type_keys`) averages per-image CIDEr-D."""
    start = time.perf_counter()
    rows = _check_rows(rows, ("image", "captions"), "captions", type_keys)
    predictions = generate_answers(
        model,
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


# -- shared ---------------------------------------------------------------------------------------------------


def load_jsonl_rows(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Rows from a JSON-lines file, one object a line; a relative "image" path is taken from the file's
    folder. Blank lines are skipped; a line that is not a JSON object is an error naming the line. With
    `limit`, a fixed random sample of that many rows (by `seed`), in file order."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if isinstance(row.get("image"), str) and not Path(row["image"]).is_absolute():
                row["image"] = str(path.parent / row["image"])
            rows.append(row)
    return _sample(rows, limit, seed)


def _check_rows(
    rows: Iterable[dict[str, Any]], required: Sequence[str], list_key: str, type_keys: Sequence[str]
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
        image = row["image"]
        if isinstance(image, Image.Image) and getattr(image, "filename", ""):
            image = image.filename
        slim.append(
            {key: row[key] for key in (*required, *type_keys) if row.get(key) is not None} | {"image": image}
        )
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
    """One JSON object a line (UTF-8, non-ASCII kept readable); parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


__all__ = [
    "DEFAULT_CAPTION_PROMPT",
    "EvalResult",
    "easy_vqa_type",
    "evaluate_captions",
    "evaluate_vqa",
    "generate_answers",
    "load_easy_vqa_rows",
    "load_jsonl_rows",
    "write_jsonl",
]
