"""Contrastive pretraining of a SigLIP dual encoder (vision + text towers) with the sigmoid loss.

    python train/pretrain_siglip.py configs/siglip_tiny_offline.yaml [--train.steps=200] [--resume]
    accelerate launch --num_processes 2 train/pretrain_siglip.py CONFIG      # DDP (CPU: gloo, GPU: NCCL)

One flat loop, the shape of `train/finetune.py`: setup -> fit -> evaluate. From scratch, or from a saved
dual encoder (`--model.init=DIR`, with its tokenizer), and/or with the vision tower of another checkpoint
(`--model.init_vision=DIR`: a SigLIP checkpoint, or a VLM's tower — pretrain a VLM's tower further, then put
it back with finetune's `model.init` + `model.vision`). Re-running the same command (or --resume) continues
from the newest complete checkpoint in the run folder: model, tokenizer, optimizer, RNG and data position
are restored, so the continued run takes the steps an uninterrupted one would. Without a CONFIG the defaults
below apply; every value is checked against its rule, and the data files named must exist, before anything
loads (`vlm.config`: exit 2 with one line naming the key). Bad caption rows are counted and skipped when the
data is built (`vlm.data`), and the counts are logged.

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
  rows, the same rows this run trains on (`vlm.siglip_eval`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from vlm.config import (  # noqa: E402
    AT_LEAST_ONE,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    REQUIRED,
    SEED,
    Checked,
    ConfigError,
    at_least,
    checked,
    constructs,
    every,
    require_folder,
    require_path,
    to_dict,
)
from vlm.data import SOURCES, SourceUnavailable, skip_report  # noqa: E402
from vlm.losses import chunked_sigmoid_loss  # noqa: E402
from vlm.model import load_vision_tower  # noqa: E402
from vlm.processing import SiglipImageProcessor  # noqa: E402
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder  # noqa: E402
from vlm.siglip_eval import SiglipEvaluator  # noqa: E402
from vlm.siglip_model import SiglipConfig, SiglipModel  # noqa: E402
from vlm.siglip_text import SiglipTextConfig  # noqa: E402
from vlm.training import (  # noqa: E402
    MetricsLog,
    Progress,
    RunBase,
    Stream,
    build_optimizer,
    cosine_lr,
    due,
    grad_sync,
    make_accelerator,
    open_run_folder,
    plot_curves,
    resume_point,
    resume_step,
    run_script,
    save_checkpoint,
    set_lr,
)
from vlm.weights import (  # noqa: E402
    CheckpointError,
    load_siglip_model,
    load_strict,
    save_siglip_model,
    save_vision_encoder,
)
from vlm.zeroshot import tokenize  # noqa: E402

if TYPE_CHECKING:
    from accelerate import Accelerator

# -- config ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSection(Checked):
    """A fresh vision tower (keys as in transformers' `SiglipVisionConfig`; it always has the MAP head)."""

    image_size: int = checked(64, AT_LEAST_ONE)  # the data is rendered at this size too
    patch_size: int = checked(8, AT_LEAST_ONE)
    hidden_size: int = checked(192, AT_LEAST_ONE)
    intermediate_size: int = checked(768, AT_LEAST_ONE)
    num_hidden_layers: int = checked(6, AT_LEAST_ONE)
    num_attention_heads: int = checked(3, AT_LEAST_ONE)

    def __post_init__(self) -> None:
        super().__post_init__()
        constructs(SiglipVisionConfig, **asdict(self))


@dataclass(frozen=True)
class TextSection(Checked):
    """A fresh text tower; its head projects to the vision hidden size (the embeddings are compared)."""

    hidden_size: int = checked(192, AT_LEAST_ONE)
    intermediate_size: int = checked(768, AT_LEAST_ONE)
    num_hidden_layers: int = checked(4, AT_LEAST_ONE)
    num_attention_heads: int = checked(3, AT_LEAST_ONE)
    # every text is padded/truncated to this many tokens: at least one and </s>
    max_position_embeddings: int = checked(24, at_least(2))
    # the BPE tokenizer's target; a small corpus may give fewer, and it never has under its 256 bytes + 2
    # special tokens (the model takes what it has)
    vocab_size: int = checked(4096, AT_LEAST_ONE)

    def __post_init__(self) -> None:
        super().__post_init__()
        constructs(SiglipTextConfig, **asdict(self))


@dataclass(frozen=True)
class ModelSection:
    init: str | None = None  # a dual encoder folder WITH its tokenizer (e.g. a run's final/); else fresh
    # the vision tower to start from, any checkpoint `vlm.model.load_vision_tower` reads (a SigLIP one, or a VLM
    # folder's tower); it replaces init's tower, or a fresh text tower is built around it (its shape, not
    # `vision`'s). A tower without a pooling head (SmolVLM's, nanoVLM's) keeps the dual encoder's (fresh
    # without `init`).
    init_vision: str | None = None
    vision: VisionSection = field(default_factory=VisionSection)
    text: TextSection = field(default_factory=TextSection)


@dataclass(frozen=True)
class Source(Checked):
    # a vlm.data.sources builder (emoji, openclipart, flags, fashion_mnist, easy-vqa), a .jsonl file of
    # {"image": path, "text": caption}, or a Hugging Face dataset (hub id or save_to_disk folder)
    name: str = checked(REQUIRED, NON_EMPTY)
    split: str = checked("train", NON_EMPTY)
    limit: int | None = checked(None, AT_LEAST_ONE)  # None: all rows
    weight: float = checked(1.0, POSITIVE)  # how many times each row is seen per epoch (fractions subsample)
    image_column: str = checked("image", NON_EMPTY)  # .jsonl and Hugging Face datasets only
    text_column: str = checked("text", NON_EMPTY)

    def check_file(self, key: str) -> None:
        """`ConfigError` naming `key` when `name` is a local file or folder that is not there (a builder's
        name or a hub id `owner/name` is not checked here)."""
        name = self.name
        local = name.endswith(".jsonl") or name.startswith(("/", ".", "~")) or name.count("/") > 1
        if name not in SOURCES and local:
            require_path(key, name, "file or folder")


@dataclass(frozen=True)
class DataSection(Checked):
    train: tuple[Source, ...] = (
        Source("emoji", weight=3.0),
        Source("openclipart"),
        Source("flags", weight=4.0),
        Source("fashion_mnist", limit=6000),
        Source("easy-vqa", limit=2000),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train:
            raise ConfigError("train = []: must name at least one source")


@dataclass(frozen=True)
class EvalSection(Checked):
    every: int = checked(0, every("only at the end"))
    # held-out Fashion-MNIST test images
    zero_shot_limit: int = checked(1000, at_least(0, "an integer >= 1, or 0 to skip zero-shot"))
    retrieval: tuple[Source, ...] = (  # held-out pairs; repeated captions are dropped (they make ties)
        Source("emoji", split="test", limit=250),
        Source("openclipart", split="test", limit=250),
    )
    baseline_limit: int = checked(
        5000, AT_LEAST_ONE
    )  # training images per source the raw-pixel baselines search
    # held-out easy-VQA test images probed for shape and colour
    easy_vqa_limit: int = checked(1000, at_least(0, "an integer >= 1, or 0 to skip it"))
    batch_size: int = checked(128, AT_LEAST_ONE)


@dataclass(frozen=True)
class TrainSection(Checked):
    out_dir: str = checked("runs/siglip", NON_EMPTY)
    steps: int = checked(1000, AT_LEAST_ONE)
    # per process and micro-step: the contrastive batch is this times the processes
    batch_size: int = checked(128, AT_LEAST_ONE)
    grad_accum: int = checked(1, AT_LEAST_ONE)
    lr: float = checked(1e-3, POSITIVE)
    warmup_steps: int = checked(100, NON_NEGATIVE_INT)
    # on matrices only (not biases, norms, logit scale and bias)
    weight_decay: float = checked(0.1, NON_NEGATIVE)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    bf16: bool = True  # autocast where the device supports bf16 (CPU with AVX-512-BF16/AMX, Ampere+ GPUs)
    checkpoint_every: int = checked(100, AT_LEAST_ONE)  # and at the last step
    log_every: int = checked(10, AT_LEAST_ONE)  # and at the last step
    seed: int = checked(0, SEED)
    equal_captions_match: bool = True  # identical captions are matches, not negatives (module docstring)


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: TrainSection = field(default_factory=TrainSection)


def check_files(cfg: PretrainConfig) -> None:
    """The local data files and folders `cfg` names exist (`ConfigError` naming the key otherwise), and the run
    folder can be one: checked before anything loads."""
    require_folder("train.out_dir", cfg.train.out_dir)
    for key in ("init", "init_vision"):
        name = getattr(cfg.model, key)
        if name is not None and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
            require_path(f"model.{key}", name, "folder")  # a hub id `owner/name` is resolved when loaded
    for i, source in enumerate(cfg.data.train):
        source.check_file(f"data.train[{i}].name")
    for i, source in enumerate(cfg.eval.retrieval):
        source.check_file(f"eval.retrieval[{i}].name")


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


def build_model(
    cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase, vision: SiglipVisionConfig | None = None
) -> SiglipModel:
    """A fresh dual encoder shaped by `cfg.model` (the tower by `vision` when given), its vocabulary and
    special ids taken from `tokenizer`."""
    t = cfg.model.text
    vision = (
        replace(vision, vision_use_head=True) if vision else SiglipVisionConfig(**asdict(cfg.model.vision))
    )
    text = SiglipTextConfig(
        **{k: val for k, val in asdict(t).items() if k != "vocab_size"},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # no BOS: texts end in </s>, then <pad> up to the fixed length
        eos_token_id=tokenizer.eos_token_id,
        projection_size=vision.hidden_size,
    )
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


def with_tower(model: SiglipModel, tower: SiglipVisionEncoder, source: str) -> SiglipModel:
    """`model` with `tower`'s weights as its vision tower (its shape too), text tower and logit scale and
    bias kept. A tower without a pooling head keeps `model`'s head (fresh, or the one `model.init` trained):
    the sigmoid loss compares pooled embeddings."""
    text = model.config.text_config
    if text.projection_size != tower.config.hidden_size:
        raise CheckpointError(
            f"model.init_vision: the tower in {source} is {tower.config.hidden_size} wide, the text tower "
            f"projects to {text.projection_size}; start the text tower fresh (no model.init) to pair them"
        )
    vision = replace(tower.config, vision_use_head=True)
    out = model if vision == model.config.vision_config else SiglipModel(SiglipConfig(text, vision))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_model.")}
    state |= {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    if not tower.config.vision_use_head:
        state |= {k: v for k, v in model.state_dict().items() if k.startswith("vision_model.head.")}
    load_strict(out, state, f"the vision tower in {source}")
    return out


def start_tower(name: str | None, log: Callable[[str], None]) -> SiglipVisionEncoder | None:
    """`model.init_vision`'s tower, or None. Its images must be normalised as SigLIP's (mean = std = 0.5):
    that is how the pretraining prepares them."""
    if not name:
        return None
    tower, processor = load_vision_tower(name)
    if tuple(processor.mean) != (0.5,) * 3 or tuple(processor.std) != (0.5,) * 3:
        raise CheckpointError(
            f"model.init_vision: {name} normalises images with mean {processor.mean} and std {processor.std}; "
            "this pretraining normalises as SigLIP does (0.5, 0.5)"
        )
    head = "" if tower.config.vision_use_head else " (no pooling head: the dual encoder keeps its own)"
    log(f"vision tower from {name}{head}")
    return tower


def load_source(source: Source, size: int) -> datasets.Dataset:
    """One source as a Dataset with (at least) image and text columns, images `size` x `size`."""
    from vlm.data import from_hf_dataset, from_jsonl
    from vlm.data.common import with_report

    if source.name in SOURCES:
        return SOURCES[source.name](split=source.split, size=size, limit=source.limit)
    if source.name.endswith(".jsonl"):
        data = from_jsonl(source.name, source.image_column, source.text_column, size=size, cache=True)
        if source.limit is None:
            return data
        return with_report(data.select(range(min(len(data), source.limit))), skip_report(data))
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
        report = skip_report(data)
        if (
            report is not None and report.skipped
        ):  # bad rows were counted and left out: say so in the run's log
            log(f"    {report.summary()}")
        loaded.append((source, data))
    return loaded


def param_groups(model: SiglipModel, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear, conv, embeddings, the MAP probe) only, as open_clip does: not on
    biases, layer norms, or the logit scale and bias, whose size carries meaning."""
    decay, plain = [], []
    for _, p in sorted(model.named_parameters()):
        (decay if p.ndim >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_evaluator(
    cfg: EvalSection, train: list[tuple[Source, datasets.Dataset]], size: int, log: Callable[[str], None]
) -> SiglipEvaluator:
    """The evaluation `cfg` describes (`vlm.siglip_eval`): its held-out retrieval sources loaded here, the
    raw-pixel baselines searching the run's own training rows."""
    return SiglipEvaluator(
        size, {source.name: data for source, data in train},
        [(source.name, data) for source, data in load_sources(cfg.retrieval, size, log)],
        zero_shot_limit=cfg.zero_shot_limit, baseline_limit=cfg.baseline_limit,
        easy_vqa_limit=cfg.easy_vqa_limit, batch_size=cfg.batch_size, log=log,
    )  # fmt: skip


def load_init(
    folder: str | Path | None, log: Callable[[str], None]
) -> tuple[SiglipModel | None, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) from a dual encoder folder that holds both (a checkpoint or `model.init`), or
    (None, None) for a fresh start."""
    if not folder:
        return None, None
    from transformers import AutoTokenizer

    model, tokenizer = load_siglip_model(folder), AutoTokenizer.from_pretrained(folder)
    log(f"model and tokenizer from {folder}")
    return model, tokenizer


def shared_tokenizer(
    cfg: PretrainConfig, sources: list[tuple[Source, datasets.Dataset]], accelerator: Accelerator
) -> PreTrainedTokenizerBase:
    """A tokenizer trained on the training captions, saved to the run's `tokenizer/`: one process trains it
    and the others read it, so all hold the same vocabulary."""
    from transformers import AutoTokenizer

    folder = Path(cfg.train.out_dir) / "tokenizer"
    if accelerator.is_main_process:
        texts = [text for _, data in sources for text in data["text"]]
        text_cfg = cfg.model.text
        train_tokenizer(texts, text_cfg.vocab_size, text_cfg.max_position_embeddings).save_pretrained(folder)
    accelerator.wait_for_everyone()
    return AutoTokenizer.from_pretrained(folder)


def tokenize_captions(
    tokenizer: PreTrainedTokenizerBase,
    sources: list[tuple[Source, datasets.Dataset]],
    length: int,
    log: Callable[[str], None],
) -> list[torch.Tensor]:
    """Every caption tokenized once, up front: (N, length) ids per source. Truncation is counted, not
    silent."""
    ids = [tokenize(tokenizer, data["text"], length) for _, data in sources]
    cut = sum(int((x[:, -1] != tokenizer.pad_token_id).sum()) for x in ids)
    if cut:
        log(f"{cut:,} captions fill all {length} tokens (longer ones are truncated, keeping </s>)")
    return ids


def caption_classes(ids: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """One id per distinct caption (as tokenised), the same on every process, as (N,) per source (equal ids
    are matches: `train.equal_captions_match`), and how many distinct captions there are."""
    distinct, inverse = torch.unique(torch.cat(ids), dim=0, return_inverse=True)
    return list(inverse.split([len(x) for x in ids])), len(distinct)


# -- the loop -------------------------------------------------------------------------------------------------


@dataclass
class Run(RunBase):
    """What the loop works on, from `setup`: the model as accelerate prepared it (`model`, DDP-wrapped with
    several processes) and unwrapped (`core`), the data as token ids and caption classes per source, and
    the step reached."""

    cfg: PretrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    core: SiglipModel
    tokenizer: PreTrainedTokenizerBase
    optimizer: torch.optim.Optimizer
    sources: list[tuple[Source, datasets.Dataset]]
    ids: list[torch.Tensor]  # (N, length) token ids per source
    caption_ids: list[torch.Tensor]  # (N,) per source: equal ids are equal captions
    stream: Stream
    processor: SiglipImageProcessor
    metrics: MetricsLog
    evaluator: SiglipEvaluator | None  # on the main process only
    step: int


def main(argv: list[str] | None = None) -> int:
    return run_script(list(sys.argv[1:] if argv is None else argv), __doc__, PretrainConfig, train)


def train(cfg: PretrainConfig, resume: bool = False) -> tuple[SiglipModel, PreTrainedTokenizerBase]:
    """Run (or continue) the pretraining described by `cfg`; returns the trained model and its tokenizer."""
    run = setup(cfg, resume)
    started = time.perf_counter()
    fit(run)
    ship(run, time.perf_counter() - started)
    return run.core, run.tokenizer


def setup(cfg: PretrainConfig, resume: bool) -> Run:
    """Model, tokenizer, optimizer, data and evaluator; from the newest checkpoint when there is one."""
    check_files(cfg)  # before anything loads
    t = cfg.train
    accelerator = make_accelerator(t.bf16, t.seed)
    log, run_dir = accelerator.print, Path(t.out_dir)
    ckpt = resume_point(run_dir, resume, to_dict(cfg), log)
    # a checkpoint or `init` brings its own tokenizer, and its shapes (then cfg.model's are not used)
    model, tokenizer = load_init(ckpt or cfg.model.init, log)
    tower = None if ckpt else start_tower(cfg.model.init_vision, log)  # a checkpoint has its tower
    if model is not None and tower is not None:
        model = with_tower(model, tower, str(cfg.model.init_vision))
    vision = model.config.vision_config if model is not None else tower.config if tower else cfg.model.vision
    size = vision.image_size
    log(f"training data at {size} px:")
    sources = load_sources(cfg.data.train, size, log)
    if not sources:
        raise SourceUnavailable(
            f"none of the training sources {[s.name for s in cfg.data.train]} is available"
        )
    if model is None:
        tokenizer = shared_tokenizer(cfg, sources, accelerator)
        torch.manual_seed(t.seed)  # the same initial weights whatever ran before
        model = build_model(cfg, tokenizer, tower.config if tower else None)
        if tower is not None:
            model = with_tower(model, tower, str(cfg.model.init_vision))
    model.train()
    length = model.config.text_config.max_position_embeddings
    params = sum(p.numel() for p in model.parameters())
    log(
        f"SigLIP: {params / 1e6:.2f} M parameters; vocabulary {len(tokenizer):,}; texts padded to {length} tokens"
    )
    optimizer = build_optimizer(param_groups(model, t.weight_decay), t.optimizer, t.lr)
    step = resume_step(ckpt, optimizer, log)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    ids = tokenize_captions(tokenizer, sources, length, log)
    stream = Stream([len(d) for _, d in sources], [s.weight for s, _ in sources], t.seed)
    log(stream.describe(t.batch_size * accelerator.num_processes * t.grad_accum, t.steps))
    metrics = open_run_folder(run_dir, cfg, accelerator.is_main_process)
    evaluator = build_evaluator(cfg.eval, sources, size, log) if accelerator.is_main_process else None
    caption_ids, distinct = caption_classes(ids)
    if t.equal_captions_match:
        log(f"{distinct:,} distinct captions among {sum(len(x) for x in ids):,} pairs; equal ones match")
    return Run(
        cfg, accelerator, wrapped, accelerator.unwrap_model(wrapped), tokenizer, optimizer, sources, ids,
        caption_ids, stream, SiglipImageProcessor(size), metrics, evaluator, step,
    )  # fmt: skip


def fit(run: Run) -> None:
    """Steps from `run.step` to `train.steps`: logging, checkpointing and (every `eval.every`) evaluating."""
    t, accelerator = run.cfg.train, run.accelerator
    progress = Progress(t.steps, run.step, "pretrain", run.per_step, accelerator.is_local_main_process)
    while run.step < t.steps:
        lr = cosine_lr(run.step, t.steps, t.warmup_steps, t.lr)
        set_lr(run.optimizer, lr)
        loss = train_step(run, micro_batches(run))
        run.step += 1
        rate = progress.update(loss, lr)
        if accelerator.is_main_process and due(run.step, t.log_every, t.steps):
            run.metrics.write(
                step=run.step, loss=loss, lr=lr, samples_per_s=rate,
                logit_scale=run.core.logit_scale.exp().item(), logit_bias=run.core.logit_bias.item(),
            )  # fmt: skip
        if due(run.step, t.checkpoint_every, t.steps):
            save_checkpoint(
                accelerator, run.dir, run.step, partial(save_dual_encoder, run), run.optimizer,
                {"position": run.step * run.per_step}, to_dict(run.cfg),
            )  # fmt: skip
        if due(run.step, run.cfg.eval.every, t.steps, at_last=False):
            evaluate(run)
    progress.close()


def micro_batches(run: Run) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """This step's micro-batches for this process: (pixels (b, 3, H, W), input ids (b, length), caption ids
    (b,) or None)."""
    t, accelerator = run.cfg.train, run.accelerator
    out = []
    for rows in run.stream.step_rows(
        run.step, t.batch_size, t.grad_accum, accelerator.num_processes, accelerator.process_index
    ):
        images = [run.sources[s][1][r]["image"] for s, r in rows]
        matches = torch.stack([run.caption_ids[s][r] for s, r in rows]) if t.equal_captions_match else None
        out.append((run.processor(images), torch.stack([run.ids[s][r] for s, r in rows]), matches))
    return out


def train_step(run: Run, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> float:
    """One optimizer step over this process's micro-batches; returns the step's loss over all processes."""
    accelerator, core, device = run.accelerator, run.core, run.accelerator.device
    step_loss = torch.zeros((), device=device)
    for i, (pixels, input_ids, match_ids) in enumerate(batches):
        with grad_sync(accelerator, run.model, last=i == len(batches) - 1):
            with accelerator.autocast():
                out = run.model(input_ids=input_ids.to(device), pixel_values=pixels.to(device))
            # fp32 loss on the embeddings: bf16 logits t*cos+b would keep ~3 significant digits. With
            # several processes, the ring-chunked loss over the global micro-batch (module docstring).
            loss = chunked_sigmoid_loss(
                out.image_embeds.float(), out.text_embeds.float(), core.logit_scale, core.logit_bias,
                match_ids=None if match_ids is None else match_ids.to(device),
            )  # fmt: skip
            accelerator.backward(loss / run.cfg.train.grad_accum)
        step_loss += loss.detach() / run.cfg.train.grad_accum
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if accelerator.num_processes > 1:  # each rank's loss is its images' share; their mean is the global loss
        dist.all_reduce(step_loss)
        step_loss /= accelerator.num_processes
    return float(step_loss)


def evaluate(run: Run) -> dict[str, float]:
    """The evaluator's scores on the main process (the others wait), written to metrics.jsonl and printed."""
    summary = {}
    if run.evaluator is not None:
        summary = run.evaluator(run.core, run.tokenizer)
        run.metrics.write_eval(run.step, summary)
        run.log(f"step {run.step}: eval " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    run.accelerator.wait_for_everyone()
    return summary


# -- saving -------------------------------------------------------------------------------------------------


def save_dual_encoder(run: Run, folder: Path) -> None:
    """The model and its tokenizer into one folder (both `from_pretrained` calls read it)."""
    save_siglip_model(run.core, folder)
    run.tokenizer.save_pretrained(folder)


def ship(run: Run, seconds: float) -> None:
    """The final evaluation, then `final/` (dual encoder + tokenizer, `vision/` the tower alone), the curves
    and the model card."""
    run.core.eval()
    summary = evaluate(run)
    if run.accelerator.is_main_process:
        final = run.dir / "final"
        save_dual_encoder(run, final)
        save_vision_encoder(run.core.vision_model, final / "vision")  # the tower alone, for the VLM
        plot_curves(
            run.metrics.read(), run.dir / "curves.png",
            ("loss", "logit_bias", "eval_zeroshot_top1", "eval_retrieval_image_to_text@1"),
            f"SigLIP {run.dir.name}",
        )  # fmt: skip
        write_model_card(final, run.cfg, run.core, run.step, run.per_step, summary, seconds)
        run.log(f"model saved to {final} (vision tower alone: {final / 'vision'})")
    run.accelerator.wait_for_everyone()


def write_model_card(
    folder: Path,
    cfg: PretrainConfig,
    model: SiglipModel,
    steps: int,
    per_step: int,
    summary: dict,
    seconds: float,
) -> None:
    """`folder/README.md`: the model's shape, data and steps, and the evaluation beside its baselines."""
    v, tx = model.config.vision_config, model.config.text_config
    sources = ", ".join(
        f"{s.name}[{s.split}]" + (f" x{s.weight:g}" if s.weight != 1 else "") for s in cfg.data.train
    )
    m = cfg.model
    start = f"from {m.init}" if m.init else "from scratch"
    if m.init_vision:
        start += f", the vision tower from {m.init_vision}"
    lines = [
        f"# {folder.parent.name}: a small SigLIP dual encoder trained here, {start}",
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
        "Baselines (vlm/siglip_eval.py `SiglipEvaluator`): zero-shot against 1-nearest-neighbour on raw pixels",
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
