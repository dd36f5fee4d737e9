"""Evaluating a SigLIP dual encoder as it pretrains, each score beside a baseline measured the same way.

    evaluator = SiglipEvaluator(64, trained={"emoji": rows}, held_out=[("emoji", test_rows)])
    scores = evaluator(model, tokenizer)    # {"zeroshot_top1": ..., "zeroshot_top1_pixel": ..., ...}

- Zero-shot top-1 on held-out Fashion-MNIST test images (class phrases averaged over the templates, as
  CLIP does) against a raw-pixel 1-nearest-neighbour classifier over labelled Fashion-MNIST training images.
- Retrieval recall@1/5 on held-out pairs against chance (k / N) and against "caption transfer": each image
  takes the caption of its raw-pixel nearest training image, and captions are ranked by TF-IDF word overlap
  with it (`caption_transfer_recall`).
- easy-VQA shape and colour read zero-shot (`easy_vqa_probe`): what a VLM built on the tower has to see.

Neither baseline is zero-shot: both see labelled training rows, the same rows the run trains on. They
depend only on the data, so they are computed once, at the first evaluation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from vlm.data import (
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    FASHION_MNIST_PHRASES,
    FASHION_MNIST_TEMPLATES,
    SOURCES,
    SourceUnavailable,
)
from vlm.processing import ImageSource, SiglipImageProcessor
from vlm.siglip_model import SiglipModel, retrieval_recall
from vlm.zeroshot import retrieval, zero_shot

# -- raw-pixel baselines ------------------------------------------------------------------------------------


def raw_pixels(images: Sequence[ImageSource], size: int) -> torch.Tensor:
    """(N, 3 * size * size) raw pixels, normalised as the model sees them."""
    return SiglipImageProcessor(size)(images).flatten(1)


def spread(data: datasets.Dataset, limit: int) -> datasets.Dataset:
    """At most `limit` rows spread evenly over `data` (builders keep their source order, e.g. emoji by
    group, so the first rows would all be smileys)."""
    step = max(1, math.ceil(len(data) / max(1, limit)))
    return data.select(range(0, len(data), step))


def pixel_nearest(
    queries: torch.Tensor, galleries: list[datasets.Dataset], size: int, batch: int = 1000
) -> list[tuple[int, int]]:
    """For each query (Q, P) raw-pixel vector, its nearest (L2) image among the galleries' rows, as (gallery,
    row). The galleries are read a batch at a time, so they never sit in memory as pixels at once."""
    best = torch.full((len(queries),), float("inf"))
    where = torch.zeros(len(queries), 2, dtype=torch.long)
    for g, gallery in enumerate(galleries):
        for start in range(0, len(gallery), batch):
            block = raw_pixels(gallery[start : start + batch]["image"], size)  # (G, P)
            distance, index = torch.cdist(queries, block).min(1)  # (Q,) each
            better = distance < best
            best = torch.where(better, distance, best)
            where[better] = torch.stack([torch.full_like(index, g), index + start], 1)[better]
    return [(int(g), int(r)) for g, r in where]


def tfidf(texts: list[str], vocabulary: dict[str, int], idf: torch.Tensor) -> torch.Tensor:
    """(N, V) TF-IDF word vectors (lower-cased alphanumeric words; unknown words ignored)."""
    out = torch.zeros(len(texts), len(vocabulary))
    for i, text in enumerate(texts):
        for word, n in Counter(re.findall(r"[a-z0-9]+", text.lower())).items():
            if word in vocabulary:
                out[i, vocabulary[word]] = n
    return out * idf


def caption_transfer_recall(
    query_pixels: torch.Tensor, captions: list[str], galleries: list[datasets.Dataset], size: int
) -> dict[str, float]:
    """The raw-pixel retrieval baseline. Pixels cannot embed text, so each held-out image borrows the caption
    of its nearest training image (raw pixels, L2); image i is then represented by the TF-IDF vector of that
    borrowed caption, caption j by its own, and recall@k is computed exactly as for the model
    (`retrieval_recall`, cosine, ties against the match)."""
    nearest = pixel_nearest(query_pixels, galleries, size)
    borrowed = [galleries[g][r]["text"] for g, r in nearest]
    words = [set(re.findall(r"[a-z0-9]+", c.lower())) for c in captions]
    vocabulary = {w: i for i, w in enumerate(sorted(set().union(*words)))}
    df = torch.zeros(len(vocabulary))
    for ws in words:
        df[[vocabulary[w] for w in ws]] += 1
    idf = torch.log((1 + len(captions)) / (1 + df)) + 1  # smoothed, as scikit-learn's TfidfVectorizer
    return retrieval_recall(tfidf(borrowed, vocabulary, idf), tfidf(captions, vocabulary, idf))


def dedupe_captions(data: datasets.Dataset) -> datasets.Dataset:
    """Keep the first row of each caption: two identical captions are indistinguishable to any model, and
    `retrieval_recall` counts the tie against the match."""
    seen: dict[str, int] = {}
    for i, text in enumerate(data["text"]):
        seen.setdefault(text, i)
    return data.select(sorted(seen.values()))


# -- the model's scores -------------------------------------------------------------------------------------


def easy_vqa_probe(
    model: SiglipModel, tokenizer: PreTrainedTokenizerBase, data: datasets.Dataset, batch_size: int = 128
) -> dict[str, float]:
    """Shape and colour read zero-shot from easy-VQA images (`SOURCES["easy-vqa"]` rows whose shape and colour
    are known): each image is scored against all 24 captions "a {colour} {shape}" and the best one's shape
    and colour are compared with the truth. This is what a VLM built on the tower has to see (chance: 1/3 for
    shape, 1/8 for colour)."""
    combos = [(c, s) for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
    probs = zero_shot(model, tokenizer, data["image"], [f"{c} {s}" for c, s in combos], ["a {}"], batch_size)
    best = [combos[i] for i in probs.argmax(-1).tolist()]
    truth = list(zip(data["color"], data["shape"], strict=True))
    n = len(truth)
    return {
        "easy_vqa_shape": sum(b[1] == t[1] for b, t in zip(best, truth, strict=True)) / n,
        "easy_vqa_color": sum(b[0] == t[0] for b, t in zip(best, truth, strict=True)) / n,
        "easy_vqa_images": n,
    }


class SiglipEvaluator:
    """Zero-shot and retrieval evaluation of a dual encoder, with its baselines.

    Held-out data: Fashion-MNIST's official test split; the emoji / clip art / flags "test" split (a fixed
    10% held out by a hash of each item, never in "train"). Baselines depend only on the data, so they are
    computed once, at the first evaluation, and reported beside every model score.

    Zero-shot: the model scores each test image against the 10 class phrases, each averaged over
    `FASHION_MNIST_TEMPLATES` (the templates the training captions use: the classes and phrasings are seen
    in training, only the images are new). Baseline: 1-nearest-neighbour on raw pixels (L2, normalised as
    the model sees them) among Fashion-MNIST training images with their labels: the training rows of this
    run (spread over at most `baseline_limit`), or, when the run does not train on Fashion-MNIST, that many
    training images. Chance is 10%.

    Retrieval: recall@1/5 image -> text and text -> image among the `held_out` pairs (captions
    deduplicated). Baselines: chance (k / N), and caption transfer from the raw-pixel nearest training
    image of the same sources (`caption_transfer_recall`).

    `trained` maps a source name to the rows the run trains on; `held_out` is (source name, held-out
    pairs) per retrieval source. A limit of 0 skips its part; a source whose package is missing is skipped
    with one line through `log`."""

    def __init__(
        self,
        size: int,
        trained: dict[str, datasets.Dataset],
        held_out: Sequence[tuple[str, datasets.Dataset]] = (),
        *,
        zero_shot_limit: int = 1000,
        baseline_limit: int = 5000,
        easy_vqa_limit: int = 1000,
        batch_size: int = 128,
        log: Callable[[str], None] = print,
    ) -> None:
        self.size, self.baseline_limit, self.batch_size = size, baseline_limit, batch_size
        self.baselines: dict[str, float] | None = None
        self.fashion: datasets.Dataset | None = None
        self.fashion_train: datasets.Dataset | None = None
        self.pairs: datasets.Dataset | None = None
        self.galleries: list[datasets.Dataset] = []
        self.easy_vqa: datasets.Dataset | None = None
        if easy_vqa_limit > 0:
            try:
                data = SOURCES["easy-vqa"](split="test", size=size, limit=easy_vqa_limit)
                self.easy_vqa = data.filter(lambda row: bool(row["shape"] and row["color"]))
            except SourceUnavailable as err:
                log(f"easy-VQA probe skipped: {err}")
        if zero_shot_limit > 0:
            try:
                self.fashion = SOURCES["fashion_mnist"](split="test", size=size, limit=zero_shot_limit)
                self.fashion_train = trained.get("fashion_mnist")
                if self.fashion_train is None:  # not trained on: that many labelled training images
                    self.fashion_train = SOURCES["fashion_mnist"](
                        split="train", size=size, limit=baseline_limit
                    )
            except SourceUnavailable as err:
                log(f"zero-shot evaluation skipped: {err}")
        if held_out:
            pairs = datasets.concatenate_datasets([d.select_columns(["image", "text"]) for _, d in held_out])
            self.pairs = dedupe_captions(pairs)
            self.galleries = [
                spread(trained[name], baseline_limit) for name, _ in held_out if name in trained
            ]

    def _compute_baselines(self) -> dict[str, float]:
        """Keys are the model's metric names plus `_pixel` (the raw-pixel baseline) or `_chance`."""
        out: dict[str, float] = {}
        if self.fashion is not None and self.fashion_train is not None:
            gallery = spread(self.fashion_train, self.baseline_limit)
            nearest = pixel_nearest(raw_pixels(self.fashion["image"], self.size), [gallery], self.size)
            labels = torch.tensor(gallery["label"])[[r for _, r in nearest]]
            out["zeroshot_top1_pixel"] = (labels == torch.tensor(self.fashion["label"])).float().mean().item()
            out["zeroshot_top1_chance"] = 1 / len(FASHION_MNIST_PHRASES)
            out["zeroshot_images"] = len(self.fashion)
            out["zeroshot_pixel_gallery"] = len(gallery)
        if self.pairs is not None:
            n = len(self.pairs)
            for direction in ("image_to_text", "text_to_image"):
                for k in (1, 5):
                    out[f"retrieval_{direction}@{k}_chance"] = min(1.0, k / n)
            if self.galleries:
                queries = raw_pixels(self.pairs["image"], self.size)
                recall = caption_transfer_recall(queries, self.pairs["text"], self.galleries, self.size)
                out |= {f"retrieval_{k}_pixel": v for k, v in recall.items()}
            out["retrieval_pairs"] = n
            out["retrieval_pixel_gallery"] = sum(len(g) for g in self.galleries)
        return out

    def __call__(self, model: SiglipModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        """{metric: value}: the model's scores, then the baselines' (computed at the first call). The model is
        left in the mode (train or eval) it came in."""
        if self.baselines is None:
            self.baselines = self._compute_baselines()
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        if self.fashion is not None:
            probs = zero_shot(
                model, tokenizer, self.fashion["image"], FASHION_MNIST_PHRASES, FASHION_MNIST_TEMPLATES,
                self.batch_size,
            )  # fmt: skip
            hits = probs.argmax(-1) == torch.tensor(self.fashion["label"])
            out["zeroshot_top1"] = hits.float().mean().item()
        if self.pairs is not None:
            recall = retrieval(
                model, tokenizer, self.pairs["image"], self.pairs["text"], (1, 5), self.batch_size
            )
            out |= {f"retrieval_{k}": v for k, v in recall.items()}
        if self.easy_vqa is not None:
            out |= easy_vqa_probe(model, tokenizer, self.easy_vqa, self.batch_size)
        model.train(was_training)
        return out | self.baselines
