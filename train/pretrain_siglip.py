"""Contrastive pretraining of a SigLIP dual encoder (vision + text towers) with the sigmoid loss.

    python train/pretrain_siglip.py configs/siglip_tiny_offline.yaml [--train.steps=200] [--resume]
    accelerate launch --num_processes 2 train/pretrain_siglip.py CONFIG      # DDP (CPU: gloo, GPU: NCCL)

One flat loop, the shape of `train/finetune.py`: setup -> fit -> evaluate. From scratch, or from a saved
dual encoder (`--model.init=DIR`, with its tokenizer). Re-running the same command (or --resume) continues
from the newest complete checkpoint in the run folder: model, tokenizer, optimizer, RNG and data position
are restored, so the continued run takes the steps an uninterrupted one would.

Writes to `train.out_dir`: `config.yaml`, `metrics.jsonl`, `curves.png`, `checkpoints/step-*/`, and
`final/` = the dual encoder in transformers' `SiglipModel` format plus its tokenizer (so
`SiglipModel.from_pretrained` and `AutoTokenizer.from_pretrained` both read the folder), `final/vision/` =
the vision tower alone in the `SiglipVisionModel` format (what the VLM loads), and `final/README.md` with
the evaluation.

Choices a reader should know
- Tokenizer: no SigLIP tokenizer exists offline, so a byte-level BPE is trained on the training captions
  (lower-cased, ~4k tokens, `</s>` appended, `<pad>` to the text tower's fixed length). Byte-level means
  no text is ever out of vocabulary.
- Loss: SigLIP's sigmoid loss over each micro-batch, in fp32 on the (bf16-autocast) embeddings. With
  several processes it is the ring-chunked loss over the global micro-batch (`vlm.losses`): each process
  keeps its b x b block of logits, never the global B x B, and DDP's gradient averaging then gives exactly
  the single-process gradient (see `chunked_sigmoid_loss`). Gradient accumulation averages micro-batch
  losses: the negatives of a pair are the other pairs of ITS micro-batch (across processes), so the
  contrastive batch is `batch_size * processes`, not that times `grad_accum`.
- Equal captions match (`train.equal_captions_match`, on by default): pairs whose captions tokenise the same
  count as matches of each other, not as negatives (`match_ids` in `vlm.losses`). The paper's labels assume
  unique captions; class-captioned data (Fashion-MNIST, easy-VQA) repeats a few captions many times per
  batch, and calling those non-matches teaches the towers to tell apart what the captions cannot.
- Evaluation (every `eval.every` steps and at the end), each beside a baseline measured the same way:
  zero-shot top-1 on held-out Fashion-MNIST test images (class phrases averaged over the templates, as
  CLIP does) against a raw-pixel 1-nearest-neighbour classifier over Fashion-MNIST training images and
  their labels; retrieval recall@1/5 on held-out emoji/clip art pairs against chance (k / N) and against
  "caption transfer": each image takes the caption of its raw-pixel nearest training image, and captions
  are ranked by TF-IDF word overlap with it. Neither baseline is zero-shot: both see labelled training
  rows, the same rows this run trains on (see `evaluate`).
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from vlm.config import dump, to_dict  # noqa: E402
from vlm.data.sources import (  # noqa: E402
    EASY_VQA_COLORS,
    EASY_VQA_SHAPES,
    FASHION_MNIST_PHRASES,
    FASHION_MNIST_TEMPLATES,
    SOURCES,
    SourceUnavailable,
)
from vlm.losses import chunked_sigmoid_loss  # noqa: E402
from vlm.processing import SiglipImageProcessor  # noqa: E402
from vlm.siglip import SiglipVisionConfig  # noqa: E402
from vlm.siglip_model import SiglipConfig, SiglipModel, retrieval_recall  # noqa: E402
from vlm.siglip_text import SiglipTextConfig  # noqa: E402
from vlm.training import (  # noqa: E402
    MetricsLog,
    Stream,
    check_resumable,
    cosine_lr,
    latest_checkpoint,
    load_training_state,
    plot_curves,
    run_script,
    save_training_checkpoint,
    set_lr,
)
from vlm.zeroshot import retrieval, tokenize, zero_shot  # noqa: E402

# -- config ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSection:
    """A fresh vision tower (keys as in transformers' `SiglipVisionConfig`; it always has the MAP head)."""

    image_size: int = 64  # the data is rendered at this size too
    patch_size: int = 8
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 3


@dataclass(frozen=True)
class TextSection:
    """A fresh text tower; its head projects to the vision hidden size (the embeddings are compared)."""

    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    max_position_embeddings: int = 24  # every text is padded/truncated to this many tokens
    vocab_size: int = (
        4096  # the BPE tokenizer's target; a small corpus may give fewer (the model takes those)
    )


@dataclass(frozen=True)
class ModelSection:
    init: str | None = None  # a dual encoder folder WITH its tokenizer (e.g. a run's final/); else fresh
    vision: VisionSection = field(default_factory=VisionSection)
    text: TextSection = field(default_factory=TextSection)


@dataclass(frozen=True)
class Source:
    # a vlm.data.sources builder (emoji, openclipart, flags, fashion_mnist, easy_vqa), a .jsonl file of
    # {"image": path, "text": caption}, or a Hugging Face dataset (hub id or save_to_disk folder)
    name: str
    split: str = "train"
    limit: int | None = None
    weight: float = 1.0  # how many times each row is seen per epoch (fractions subsample)
    image_column: str = "image"  # .jsonl and Hugging Face datasets only
    text_column: str = "text"


@dataclass(frozen=True)
class DataSection:
    train: tuple[Source, ...] = (
        Source("emoji", weight=3.0),
        Source("openclipart"),
        Source("flags", weight=4.0),
        Source("fashion_mnist", limit=6000),
        Source("easy_vqa", limit=2000),
    )


@dataclass(frozen=True)
class EvalSection:
    every: int = 0  # 0: only at the end
    zero_shot_limit: int = 1000  # held-out Fashion-MNIST test images; 0 skips zero-shot
    retrieval: tuple[Source, ...] = (  # held-out pairs; repeated captions are dropped (they make ties)
        Source("emoji", split="test", limit=250),
        Source("openclipart", split="test", limit=250),
    )
    baseline_limit: int = 5000  # training images per source that the raw-pixel baselines search
    easy_vqa_limit: int = 1000  # held-out easy-VQA test images probed for shape and colour; 0 skips it
    batch_size: int = 128


@dataclass(frozen=True)
class TrainSection:
    out_dir: str = "runs/siglip"
    steps: int = 1000
    batch_size: int = 128  # per process and micro-step: the contrastive batch is this times the processes
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not biases, norms, logit scale and bias)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    bf16: bool = True  # autocast where the device supports bf16 (CPU with AVX-512-BF16/AMX, Ampere+ GPUs)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    equal_captions_match: bool = True  # identical captions are matches, not negatives (module docstring)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)


# -- setup -------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`: lower-cased (NFKC first), `</s>` appended to every text,
    `<pad>` (id 0) for padding, wrapped as a transformers fast tokenizer that saves and loads with
    `save_pretrained` / `AutoTokenizer.from_pretrained`. Trained on the distinct texts, so one caption
    repeated 10,000 times (Fashion-MNIST's templates) does not spend the vocabulary on itself."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(sorted(set(texts)), trainer)
    eos = tokenizer.token_to_id("</s>")
    # truncation keeps room for it, so a long caption still ends in </s>
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", model_max_length=max_length
    )


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> SiglipModel:
    """A fresh dual encoder shaped by `cfg.model`, its vocabulary and special ids taken from `tokenizer`."""
    v, t = cfg.model.vision, cfg.model.text
    vision = SiglipVisionConfig(**asdict(v))
    text = SiglipTextConfig(
        **{k: val for k, val in asdict(t).items() if k != "vocab_size"},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # no BOS: texts end in </s>, then <pad> up to the fixed length
        eos_token_id=tokenizer.eos_token_id,
        projection_size=v.hidden_size,
    )
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


def load_source(source: Source, size: int) -> datasets.Dataset:
    """One source as a Dataset with (at least) image and text columns, images `size` x `size`."""
    from vlm.data.pairs import from_hf_dataset, from_jsonl

    if source.name in SOURCES:
        return SOURCES[source.name](split=source.split, size=size, limit=source.limit)
    if source.name.endswith(".jsonl"):
        data = from_jsonl(source.name, source.image_column, source.text_column, size=size, cache=True)
        return data.select(range(min(len(data), source.limit))) if source.limit is not None else data
    return from_hf_dataset(
        source.name, source.image_column, source.text_column, source.split,
        size=size, limit=source.limit, cache=True,
    )  # fmt: skip


def load_sources(
    sources: tuple[Source, ...], size: int, log: Callable[[str], None]
) -> list[tuple[Source, datasets.Dataset]]:
    """The sources that are available here; a missing package skips its source with one line (as
    `vlm.data.sources.build_mixture` does), an empty result is an error."""
    loaded = []
    for source in sources:
        try:
            data = load_source(source, size)
        except SourceUnavailable as err:
            log(f"{source.name}: skipped, not available: {err}")
            continue
        log(f"  {source.name}[{source.split}]: {len(data):,} pairs, weight {source.weight}")
        loaded.append((source, data))
    return loaded


def param_groups(model: SiglipModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, conv, embeddings, the MAP probe) only, as open_clip does: not on
    biases, layer norms, or the logit scale and bias, whose size carries meaning."""
    decay, plain = [], []
    for _, p in sorted(model.named_parameters()):
        (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# -- evaluation ---------------------------------------------------------------------------------------------


def _pixels(images: list, size: int) -> torch.Tensor:
    """(N, 3 * size * size) raw pixels, normalised as the model sees them."""
    return SiglipImageProcessor(size)(images).flatten(1)


def _spread(data: datasets.Dataset, limit: int) -> datasets.Dataset:
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
            block = _pixels(gallery[start : start + batch]["image"], size)  # (G, P)
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


def _dedupe_captions(data: datasets.Dataset) -> datasets.Dataset:
    """Keep the first row of each caption: two identical captions are indistinguishable to any model, and
    `retrieval_recall` counts the tie against the match."""
    seen: dict[str, int] = {}
    for i, text in enumerate(data["text"]):
        seen.setdefault(text, i)
    return data.select(sorted(seen.values()))


def easy_vqa_probe(
    model: SiglipModel, tokenizer: PreTrainedTokenizerBase, data: datasets.Dataset, batch_size: int = 128
) -> dict[str, float]:
    """Shape and colour read zero-shot from easy-VQA images (`SOURCES["easy_vqa"]` rows whose shape and colour
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


class Evaluator:
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

    Retrieval: recall@1/5 image -> text and text -> image among the held-out pairs of `eval.retrieval`
    (captions deduplicated). Baselines: chance (k / N), and caption transfer from the raw-pixel nearest
    training image of the same sources (`caption_transfer_recall`)."""

    def __init__(
        self,
        cfg: EvalSection,
        train: list[tuple[Source, datasets.Dataset]],
        size: int,
        log: Callable[[str], None],
    ) -> None:
        self.cfg, self.size = cfg, size
        self.trained = {source.name: data for source, data in train}
        self.baselines: dict[str, float] | None = None
        self.fashion: datasets.Dataset | None = None
        self.fashion_train: datasets.Dataset | None = None
        self.pairs: datasets.Dataset | None = None
        self.galleries: list[datasets.Dataset] = []
        self.easy_vqa: datasets.Dataset | None = None
        if cfg.easy_vqa_limit > 0:
            try:
                data = SOURCES["easy_vqa"](split="test", size=size, limit=cfg.easy_vqa_limit)
                self.easy_vqa = data.filter(lambda row: bool(row["shape"] and row["color"]))
            except SourceUnavailable as err:
                log(f"easy-VQA probe skipped: {err}")
        if cfg.zero_shot_limit > 0:
            try:
                self.fashion = SOURCES["fashion_mnist"](split="test", size=size, limit=cfg.zero_shot_limit)
                self.fashion_train = self.trained.get("fashion_mnist")
                if self.fashion_train is None:  # not trained on: that many labelled training images
                    self.fashion_train = SOURCES["fashion_mnist"](
                        split="train", size=size, limit=cfg.baseline_limit
                    )
            except SourceUnavailable as err:
                log(f"zero-shot evaluation skipped: {err}")
        if cfg.retrieval:
            parts = load_sources(cfg.retrieval, size, log)
            if parts:
                pairs = datasets.concatenate_datasets([d.select_columns(["image", "text"]) for _, d in parts])
                self.pairs = _dedupe_captions(pairs)
            self.galleries = [
                _spread(self.trained[s.name], cfg.baseline_limit) for s, _ in parts if s.name in self.trained
            ]

    def _compute_baselines(self) -> dict[str, float]:
        """Keys are the model's metric names plus `_pixel` (the raw-pixel baseline) or `_chance`."""
        out: dict[str, float] = {}
        if self.fashion is not None and self.fashion_train is not None:
            gallery = _spread(self.fashion_train, self.cfg.baseline_limit)
            nearest = pixel_nearest(_pixels(self.fashion["image"], self.size), [gallery], self.size)
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
                queries = _pixels(self.pairs["image"], self.size)
                recall = caption_transfer_recall(queries, self.pairs["text"], self.galleries, self.size)
                out |= {f"retrieval_{k}_pixel": v for k, v in recall.items()}
            out["retrieval_pairs"] = n
            out["retrieval_pixel_gallery"] = sum(len(g) for g in self.galleries)
        return out

    def __call__(self, model: SiglipModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
        """{metric: value}: the model's scores, then the baselines' (computed at the first call)."""
        if self.baselines is None:
            self.baselines = self._compute_baselines()
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        if self.fashion is not None:
            probs = zero_shot(
                model, tokenizer, self.fashion["image"], FASHION_MNIST_PHRASES, FASHION_MNIST_TEMPLATES,
                self.cfg.batch_size,
            )  # fmt: skip
            hits = probs.argmax(-1) == torch.tensor(self.fashion["label"])
            out["zeroshot_top1"] = hits.float().mean().item()
        if self.pairs is not None:
            recall = retrieval(
                model, tokenizer, self.pairs["image"], self.pairs["text"], (1, 5), self.cfg.batch_size
            )
            out |= {f"retrieval_{k}": v for k, v in recall.items()}
        if self.easy_vqa is not None:
            out |= easy_vqa_probe(model, tokenizer, self.easy_vqa, self.cfg.batch_size)
        model.train(was_training)
        return out | self.baselines


# -- the loop -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return run_script(list(sys.argv[1:] if argv is None else argv), __doc__, PretrainConfig, train)


def train(cfg: PretrainConfig, resume: bool = False) -> tuple[SiglipModel, PreTrainedTokenizerBase]:
    """Run (or continue) the pretraining described by `cfg`; returns the trained model and its tokenizer."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    t = cfg.train
    # cpu=True on a machine without CUDA: accelerate then treats torchrun's WORLD_SIZE > 1 as multi-process
    # CPU (gloo); without it each process would train alone.
    accelerator = Accelerator(mixed_precision="bf16" if t.bf16 else "no", cpu=not torch.cuda.is_available())
    log = accelerator.print
    run = Path(t.out_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # setup: a checkpoint (resume) or `init` brings its own tokenizer; else one is trained on the captions
    ckpt = latest_checkpoint(run, log) if (resume or run.exists()) else None
    if ckpt is not None:
        check_resumable(ckpt, to_dict(cfg))
    init = ckpt or cfg.model.init  # then cfg.model's shapes are not used: the folder says them
    model = tokenizer = None
    if init:
        model, tokenizer = SiglipModel.from_pretrained(init), AutoTokenizer.from_pretrained(init)
        log(f"model and tokenizer from {init}")
    size = model.config.vision_config.image_size if model is not None else cfg.model.vision.image_size
    log(f"training data at {size} px:")
    sources = load_sources(cfg.data.train, size, log)
    if not sources:
        raise SourceUnavailable(
            f"none of the training sources {[s.name for s in cfg.data.train]} is available"
        )
    if model is None:
        # one process trains the tokenizer and the others read it, so all hold the same vocabulary
        folder = run / "tokenizer"
        if accelerator.is_main_process:
            texts = [text for _, data in sources for text in data["text"]]
            text_cfg = cfg.model.text
            train_tokenizer(texts, text_cfg.vocab_size, text_cfg.max_position_embeddings).save_pretrained(
                folder
            )
        accelerator.wait_for_everyone()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(t.seed)  # the same initial weights whatever ran before
        model = build_model(cfg, tokenizer)
    model.train()
    length = model.config.text_config.max_position_embeddings
    params = sum(p.numel() for p in model.parameters())
    log(
        f"SigLIP: {params / 1e6:.2f} M parameters; vocabulary {len(tokenizer):,}; texts padded to {length} tokens"
    )
    groups = param_groups(model, t.weight_decay)
    optimizer = (
        torch.optim.AdamW(groups, lr=t.lr) if t.optimizer == "adamw" else torch.optim.SGD(groups, lr=t.lr)
    )
    step = 0
    if ckpt is not None:
        step = load_training_state(ckpt, optimizer)["step"]
        log(f"resumed from {ckpt} at step {step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    core: SiglipModel = accelerator.unwrap_model(model)

    # Captions tokenized once, up front: (N, length) per source. Truncation is counted, not silent.
    ids = [tokenize(tokenizer, data["text"], length) for _, data in sources]
    cut = sum(int((x[:, -1] != tokenizer.pad_token_id).sum()) for x in ids)
    if cut:
        log(f"{cut:,} captions fill all {length} tokens (longer ones are truncated, keeping </s>)")
    stream = Stream([len(d) for _, d in sources], [s.weight for s, _ in sources], t.seed)
    per_step = t.batch_size * world * t.grad_accum
    log(
        f"{stream.epoch_len:,} rows an epoch; {per_step} a step; {t.steps} steps = "
        f"{t.steps * per_step / stream.epoch_len:.2f} epochs"
    )
    processor = SiglipImageProcessor(size)
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        dump(cfg, run / "config.yaml")
    metrics = MetricsLog(run / "metrics.jsonl")
    evaluator = Evaluator(cfg.eval, sources, size, log) if accelerator.is_main_process else None

    # One id per distinct caption (as tokenised), the same on every process: equal ids are matches.
    distinct, inverse = torch.unique(torch.cat(ids), dim=0, return_inverse=True)
    caption_ids = inverse.split([len(x) for x in ids])
    if t.equal_captions_match:
        log(f"{len(distinct):,} distinct captions among {len(inverse):,} pairs; equal ones match")

    def micro_batches(position: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """This step's micro-batches for this process: (pixels (b, 3, H, W), input ids (b, length), caption
        ids (b,) or None)."""
        out = []
        for micro in range(t.grad_accum):
            pairs = stream.take(position + micro * t.batch_size * world, t.batch_size * world)
            mine = pairs[rank * t.batch_size : (rank + 1) * t.batch_size]
            images = [sources[s][1][r]["image"] for s, r in mine]
            matches = torch.stack([caption_ids[s][r] for s, r in mine]) if t.equal_captions_match else None
            out.append((processor(images), torch.stack([ids[s][r] for s, r in mine]), matches))
        return out

    def save(at: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:

            def write_model(folder: Path) -> None:
                core.save_pretrained(folder)
                tokenizer.save_pretrained(folder)

            save_training_checkpoint(
                run, at, write_model, optimizer, {"position": at * per_step}, to_dict(cfg)
            )
        accelerator.wait_for_everyone()

    def evaluate_now() -> dict[str, float]:
        summary = {}
        if evaluator is not None:
            summary = evaluator(core, tokenizer)
            metrics.write(step=step, **{f"eval_{k}": v for k, v in summary.items()})
            log(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
        accelerator.wait_for_everyone()
        return summary

    # fit
    bar = tqdm(total=t.steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process)
    started, seen = time.perf_counter(), 0
    while step < t.steps:
        lr = cosine_lr(step, t.steps, t.warmup_steps, t.lr)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=accelerator.device)
        batches = micro_batches(step * per_step)
        for i, (pixels, input_ids, match_ids) in enumerate(batches):
            sync = i == len(batches) - 1
            with accelerator.no_sync(model) if not sync and world > 1 else nullcontext():
                with accelerator.autocast():
                    out = model(
                        input_ids=input_ids.to(accelerator.device), pixel_values=pixels.to(accelerator.device)
                    )
                # fp32 loss on the embeddings: bf16 logits t*cos+b would keep ~3 significant digits. With
                # several processes, the ring-chunked loss over the global micro-batch (module docstring).
                loss = chunked_sigmoid_loss(
                    out.image_embeds.float(), out.text_embeds.float(), core.logit_scale, core.logit_bias,
                    match_ids=None if match_ids is None else match_ids.to(accelerator.device),
                )  # fmt: skip
                accelerator.backward(loss / t.grad_accum)
            step_loss += loss.detach() / t.grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += per_step
        if world > 1:  # each rank's loss is its images' share; their mean is the global loss
            dist.all_reduce(step_loss)
            step_loss /= world
        mean_loss = float(step_loss)
        rate = seen / (time.perf_counter() - started)
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", it_s=f"{rate:.1f}")
        if accelerator.is_main_process and (step % t.log_every == 0 or step == t.steps):
            metrics.write(
                step=step, loss=mean_loss, lr=lr, samples_per_s=rate,
                logit_scale=core.logit_scale.exp().item(), logit_bias=core.logit_bias.item(),
            )  # fmt: skip
        if step % t.checkpoint_every == 0 or step == t.steps:
            save(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step != t.steps:
            evaluate_now()
    bar.close()
    seconds = time.perf_counter() - started

    # evaluate and ship
    core.eval()
    summary = evaluate_now()
    if accelerator.is_main_process:
        final = run / "final"
        core.save_pretrained(final)
        tokenizer.save_pretrained(final)
        core.vision_model.save_pretrained(final / "vision")  # the tower alone, for the VLM
        plot_curves(
            metrics.read(), run / "curves.png",
            ("loss", "logit_bias", "eval_zeroshot_top1", "eval_retrieval_image_to_text@1"), f"SigLIP {run.name}",
        )  # fmt: skip
        write_model_card(final, cfg, core, step, per_step, summary, seconds)
        log(f"model saved to {final} (vision tower alone: {final / 'vision'})")
    accelerator.wait_for_everyone()
    return core, tokenizer


def write_model_card(
    folder: Path,
    cfg: PretrainConfig,
    model: SiglipModel,
    steps: int,
    per_step: int,
    summary: dict,
    seconds: float,
) -> None:
    v, tx = model.config.vision_config, model.config.text_config
    sources = ", ".join(
        f"{s.name}[{s.split}]" + (f" x{s.weight:g}" if s.weight != 1 else "") for s in cfg.data.train
    )
    lines = [
        f"# {folder.parent.name}: a small SigLIP dual encoder trained here, from scratch",
        "",
        f"- vision: {v.image_size} px, patch {v.patch_size}, {v.num_hidden_layers} layers x {v.hidden_size} "
        f"({v.num_attention_heads} heads), MAP head",
        f"- text: byte-level BPE, {tx.vocab_size} tokens, {tx.max_position_embeddings} positions, "
        f"{tx.num_hidden_layers} layers x {tx.hidden_size}",
        f"- data: {sources}",
        f"- steps: {steps} x {per_step} pairs; training time {seconds / 60:.1f} min",
        "- files: `SiglipModel` + tokenizer here, `vision/` the `SiglipVisionModel` tower alone",
        "",
        "## Evaluation on held-out images",
        "",
        "Baselines (train/pretrain_siglip.py `Evaluator`): zero-shot against 1-nearest-neighbour on raw pixels",
        "over labelled Fashion-MNIST training images; retrieval against caption transfer from the raw-pixel",
        "nearest training image (TF-IDF word overlap). Both baselines see labelled training rows.",
        "",
        "| metric | model | raw-pixel baseline | chance |",
        "|---|---|---|---|",
    ]
    for key, value in summary.items():
        if key.endswith(("_pixel", "_chance")) or not isinstance(value, float):
            continue
        pixel, chance = summary.get(f"{key}_pixel"), summary.get(f"{key}_chance")
        cells = [f"{x:.3f}" if x is not None else "-" for x in (value, pixel, chance)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    counts = {k: v for k, v in summary.items() if isinstance(v, int)}
    lines += ["", ", ".join(f"{k}: {v:,}" for k, v in counts.items()), ""]
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
