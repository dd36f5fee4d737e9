"""Fine-tune a VisionLanguageModel for VQA and captioning: projector fully, the LM through LoRA (peft).

    python train/finetune.py configs/easyvqa_offline.yaml [--train.steps=200] [--resume]
    accelerate launch --num_processes 2 train/finetune.py CONFIG      # DDP (CPU: gloo, GPU: NCCL)

One flat loop: setup -> fit -> evaluate. accelerate does devices and processes; peft does LoRA; datasets
holds the data. Re-running the same command (or --resume) continues from the newest complete checkpoint
in the run folder: model, optimizer, RNG and data position are restored, so a run killed with SIGKILL ends
where an uninterrupted one would. Without a CONFIG the defaults below apply (`--key=value` overrides either).

Careless input stops a run before anything loads, or never: every config value is checked against its rule
when the config is read (`vlm.config`; exit 2 with one line naming the key), and so are the data files it
names. A data row that cannot be used (its image unreadable, a 0-byte file, a decompression bomb, or longer
than `data.max_length`) is dropped from its micro-batch when that is built, remembered so it is not tried
again, and counted: the run's log ends with how many rows were skipped and why.

Loss scaling: each micro-batch contributes the SUM of its learned tokens' cross-entropies divided by the
number of learned tokens in the whole optimizer step across all processes (counted before the forward
passes), times the number of processes because DDP averages gradients. So one step on N processes equals
one step on one process over the same global batch, whatever the padding or answer lengths.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from vlm.config import (  # noqa: E402
    AT_LEAST_ONE,
    NON_EMPTY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    PROBABILITY,
    REGEX,
    REQUIRED,
    SEED,
    SHARE,
    Checked,
    ConfigError,
    checked,
    constructs,
    every,
    require_folder,
    require_path,
    shown,
    to_dict,
)
from vlm.data.common import SkipReport, SourceUnavailable  # noqa: E402
from vlm.data.named import DataError, DataSpec, Rows, open_data, reads_rows_of  # noqa: E402
from vlm.lm import DEFAULT_LM  # noqa: E402
from vlm.lora import (  # noqa: E402
    LM_ALL_LINEAR,
    LoraSettings,
    adapter_differences,
    add_lora,
    lora_modules,
    save_adapter,
    set_dropout,
)
from vlm.model import Batch, VisionLanguageModel, VLMConfig, load_vision_tower  # noqa: E402
from vlm.pipeline import StepBatches, default_workers, prepare_ahead, step_loader  # noqa: E402
from vlm.projector import ProjectorConfig, check_divisible  # noqa: E402
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder  # noqa: E402
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
from vlm.weights import CheckpointError, load_strict  # noqa: E402

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

# -- config ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection(Checked):
    init: str | None = None  # a saved VLM folder to continue from; else one is built from the fields below
    # the tower: a SigLIP checkpoint (hub id or folder) or a VLM folder's tower (`vlm.model.load_vision_tower`);
    # else a fresh one. With `init` it replaces init's tower, which it must be shaped like (e.g. init's tower
    # pretrained further by train/pretrain_siglip.py's `model.init_vision`).
    vision: str | None = None
    image_size: int = checked(64, AT_LEAST_ONE)  # fresh tower only
    patch_size: int = checked(8, AT_LEAST_ONE)
    hidden_size: int = checked(192, AT_LEAST_ONE)
    intermediate_size: int = checked(768, AT_LEAST_ONE)
    num_hidden_layers: int = checked(6, AT_LEAST_ONE)
    num_attention_heads: int = checked(3, AT_LEAST_ONE)
    projector: Literal["linear", "mlp", "pixel_shuffle"] = "pixel_shuffle"
    scale_factor: int = checked(2, AT_LEAST_ONE)
    # Also the tower's pooled embedding, as one more image token (vlm/projector.py).
    pooled_token: bool = False
    lm: str = checked(DEFAULT_LM, NON_EMPTY)
    quantization: Literal["4bit", "8bit"] | None = None  # QLoRA: the frozen LM in 4-bit
    vision_feature_layer: int = -1  # -1: the tower's output; else an index into its hidden states
    system_prompt: str | None = None
    adapter_on_text: bool = True  # False: text-only chat bypasses LoRA (VLMConfig.adapter_on_text)
    train_vision: Literal["frozen", "full", "lora"] = "frozen"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init is None and self.vision is None:
            check_fresh_tower(self)


def check_fresh_tower(m: ModelSection) -> None:
    """The shape rules of a fresh tower and its projector, checked where the config is built (the LM would
    otherwise load first): the tower's own (`SiglipVisionConfig`), the pixel-shuffle grid, the layer index."""
    constructs(
        SiglipVisionConfig, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        image_size=m.image_size, patch_size=m.patch_size,
    )  # fmt: skip
    if m.projector == "pixel_shuffle":
        grid = (m.image_size // m.patch_size,) * 2
        constructs(check_divisible, "scale_factor", grid=grid, factor=m.scale_factor)
    layers = m.num_hidden_layers
    # the tower's hidden states are its embeddings, then one per layer
    if not -(layers + 1) <= m.vision_feature_layer <= layers:
        raise ConfigError(
            f"vision_feature_layer = {m.vision_feature_layer}: must be in [{-(layers + 1)}, {layers}] for a "
            f"tower of {layers} layers"
        )


@dataclass(frozen=True)
class LoraSection(Checked):
    r: int = checked(16, AT_LEAST_ONE)
    alpha: int = checked(32, AT_LEAST_ONE)
    dropout: float = checked(0.05, PROBABILITY)
    # regex over full module names; with train_vision=lora the tower's q/v join
    target: str = checked(LM_ALL_LINEAR, REGEX)


@dataclass(frozen=True)
class Source(Checked):
    """One data source (`vlm.data.named`): what the rows are (`kind`) and where they come from (`name`)."""

    kind: Literal["vqa", "caption", "chat"]
    # a packaged source (easy-vqa; emoji, flags, ...), a .jsonl/.json/.parquet/.csv file, a folder or a hub id
    name: str = checked(REQUIRED, NON_EMPTY)
    subset: str | None = checked(None, NON_EMPTY)  # the hub dataset's configuration
    split: str = checked("train", NON_EMPTY)  # or a slice as `datasets` reads one: "train[:5%]", "train[5%:]"
    columns: dict[str, str] = field(default_factory=dict)  # our field -> the dataset's column
    limit: int | None = checked(None, AT_LEAST_ONE)  # None: all rows (a stream: the rows to read)
    weight: float = checked(1.0, POSITIVE)  # how many times each row is seen per epoch (fractions subsample)
    streaming: bool = False  # read rows in order, never holding the set (a hub set too big to download)
    image_root: str | None = checked(
        None, NON_EMPTY
    )  # relative image paths start here; default: the file's folder
    # the share of rows whose user turns start upper-case, drawn each visit (easy-VQA's are all lower case)
    capitalise: float = checked(0.0, SHARE)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.spec()  # the columns' fields fit the kind, and name columns
        except DataError as err:
            raise ConfigError(str(err).removeprefix(f"{self.name}: ")) from None

    def spec(self) -> DataSpec:
        return DataSpec(
            self.kind, self.name, self.subset, self.split, dict(self.columns), self.limit, self.streaming,
            self.image_root, capitalise=self.capitalise,
        )  # fmt: skip


@dataclass(frozen=True)
class DataSection(Checked):
    train: tuple[Source, ...] = (Source(kind="vqa", name="easy-vqa"),)
    # scored during and after training: VQA accuracy, caption BLEU-4/CIDEr, chat answers (vlm.evaluate)
    eval: Source | None = Source(kind="vqa", name="easy-vqa", split="test", limit=500)
    max_length: int = checked(512, AT_LEAST_ONE)  # longer conversations are skipped and counted
    # Pack each micro-batch's conversations into rows of max_length tokens (a block-diagonal mask keeps them
    # apart) instead of padding each to the longest: the same loss, less work where lengths vary.
    pack: bool = False
    # Tokenise and process every source's rows once, before the first step, into files every worker and every
    # later run reads (vlm.pipeline.prepare_ahead); null: where DataLoader workers build the batches (a GPU).
    prepare_ahead: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train:
            raise ConfigError("train = []: must name at least one source")


@dataclass(frozen=True)
class TrainSection(Checked):
    out_dir: str = checked("runs/finetune", NON_EMPTY)
    steps: int = checked(1000, AT_LEAST_ONE)
    batch_size: int = checked(16, AT_LEAST_ONE)  # per process and micro-step
    grad_accum: int = checked(1, AT_LEAST_ONE)
    lr: float = checked(2e-4, POSITIVE)  # LoRA
    lr_projector: float = checked(1e-3, POSITIVE)
    lr_vision: float = checked(2e-4, POSITIVE)
    warmup_steps: int = checked(50, NON_NEGATIVE_INT)
    weight_decay: float = checked(0.0, NON_NEGATIVE)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    bf16: bool = True  # autocast where the device supports bf16 (CPU with AVX-512/AMX, Ampere+ GPUs)
    gradient_checkpointing: bool = False
    checkpoint_every: int = checked(100, AT_LEAST_ONE)  # and at the last step
    eval_every: int = checked(0, every("only at the end"))
    eval_batch_size: int = checked(64, AT_LEAST_ONE)
    log_every: int = checked(10, AT_LEAST_ONE)  # and at the last step
    seed: int = checked(0, SEED)
    tensorboard: bool = False
    # processes building batches ahead of the model (vlm.pipeline); null: none on the CPU, else the spare CPUs
    num_workers: int | None = checked(None, NON_NEGATIVE_INT)


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


def check_files(cfg: FinetuneConfig) -> None:
    """The run folder can be written and a GGUF LM file exists (`ConfigError` naming the key otherwise):
    checked before anything loads. Model folders and hub ids are checked by their loaders, which fail before
    loading anything; data sources by `open_sources`."""
    require_folder("train.out_dir", cfg.train.out_dir)
    lm = cfg.model.lm
    if cfg.model.init is None and lm.endswith(".gguf") and not lm.startswith("package:"):
        require_path("model.lm", lm)


def open_sources(cfg: FinetuneConfig) -> tuple[list[Rows], Rows | None]:
    """Every `data.train` source and `data.eval`, opened and checked against its kind before any model loads:
    one `ConfigError` with a line per source that cannot be used (a missing file, an unknown column, a kind
    the rows do not fit)."""
    entries = [(f"data.train[{i}]", source) for i, source in enumerate(cfg.data.train)]
    if cfg.data.eval is not None:
        entries.append(("data.eval", cfg.data.eval))
    opened, errors = [], []
    for key, source in entries:
        try:
            opened.append(open_data(source.spec()))
        except (DataError, SourceUnavailable) as err:
            errors.append(f"{key}.name = {shown(source.name)}: {str(err).removeprefix(f'{source.name}: ')}")
    if errors:
        raise ConfigError("\n".join(errors))
    return opened[: len(cfg.data.train)], (opened[-1] if cfg.data.eval is not None else None)


# -- setup -------------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig) -> VisionLanguageModel:
    """The VLM `cfg.model` describes, before LoRA: from `init` (with its adapter, if it has one; its tower
    replaced by `vision`'s when that is named), or built from a tower (`vision`, else a fresh one), a fresh
    projector and the LM `lm`."""
    m = cfg.model
    freeze = ("lm",) if m.train_vision == "full" else ("vision", "lm")
    vision = load_vision_tower(m.vision)[0] if m.vision else None
    if m.init is not None:  # its adapter/, when there is one, comes with it
        model = VisionLanguageModel.from_pretrained(m.init, quantization=m.quantization)
        model.config = replace(model.config, freeze=freeze)
        if vision is not None:
            swap_tower(model, vision, m.vision)
        return model
    vision_config = vision.config if vision is not None else SiglipVisionConfig(
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, image_size=m.image_size, patch_size=m.patch_size,
    )  # fmt: skip
    from vlm.lm import load_lm, quantization_of

    lm, tokenizer = load_lm(m.lm, quantization=m.quantization)
    config = VLMConfig(
        vision=vision_config,
        projector=ProjectorConfig(
            vision_config.hidden_size, lm.config.hidden_size, m.projector, m.scale_factor, m.pooled_token
        ),
        lm_source=m.lm,
        vision_feature_layer=m.vision_feature_layer,
        system_prompt=m.system_prompt,
        freeze=freeze,
        adapter_on_text=m.adapter_on_text,
        quantization=quantization_of(lm),  # exactly as loaded: a reload quantises the LM the same way
    )
    model = VisionLanguageModel.build(config, lm=(lm, tokenizer))
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    return model


def swap_tower(model: VisionLanguageModel, tower: SiglipVisionEncoder, source: str) -> None:
    """`tower`'s weights into `model`'s tower, strictly. Same shape only: the projector reads its features and
    the processor sizes its images. A pooling head `model`'s tower has no use for (a SigLIP pretraining adds
    one) is left out; one it has and `tower` lacks is an error."""
    ours = model.config.vision
    if replace(tower.config, vision_use_head=ours.vision_use_head) != ours or (
        ours.vision_use_head and not tower.config.vision_use_head
    ):
        raise CheckpointError(
            f"model.vision: the tower in {source} ({tower.config}) is not shaped like model.init's ({ours}); a "
            "tower of another shape wants a fresh projector: drop model.init"
        )
    state = tower.state_dict()
    if not ours.vision_use_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_strict(model.vision, state, f"the vision tower in {source}")


def lora_settings(cfg: FinetuneConfig) -> LoraSettings:
    """`cfg.lora` for peft; with `train_vision: lora` the tower's attention q/v projections join its
    target."""
    target = cfg.lora.target
    if cfg.model.train_vision == "lora":
        target += r"|vision\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj"
    return LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, target)


def make_trainable(model: VisionLanguageModel, settings: LoraSettings, gradient_checkpointing: bool) -> None:
    """LoRA on the LM (unless the model brought its adapter: a checkpoint or an `init` folder does), the
    `freeze`d parts frozen and every LoRA weight trainable, whatever it sits under.

    A brought adapter is trained on as it is, so it must be the one `settings` describe: the run saves its
    adapter under these settings, and a rank, alpha or target that differ would save an adapter that does not
    load, or loads scaled wrongly (alpha / r). Its dropout is the run's own."""
    if not lora_modules(model):
        add_lora(model, settings)
    elif differences := adapter_differences(model, settings):
        raise ValueError(
            f"model.init's LoRA adapter is not the config's lora section ({'; '.join(differences)}): set lora "
            "r, alpha and target to the adapter's (its adapter/adapter_config.json, vlm_lora) to train it on, "
            "or fold it into the model first (`vlm merge INIT OUT`, then model.init: OUT) to train a new one"
        )
    else:
        set_dropout(model, settings.dropout)
    model.freeze(model.config.freeze)
    for name, p in model.named_parameters():
        p.requires_grad |= "lora_" in name
    if gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def param_groups(model: VisionLanguageModel, t: TrainSection) -> list[dict]:
    """Per-module learning rates, as multiples of the scheduled LR (`lr_scale`, see vlm.training.set_lr)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"lora": [], "projector": [], "vision": [], "other": []}
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            continue
        key = "lora" if "lora_" in name else name.split(".")[0]
        groups[key if key in groups else "other"].append(p)
    scale = {"lora": 1.0, "projector": t.lr_projector / t.lr, "vision": t.lr_vision / t.lr, "other": 1.0}
    return [
        {"params": ps, "lr_scale": scale[k], "weight_decay": t.weight_decay, "name": k}
        for k, ps in groups.items()
        if ps
    ]


def log_trainable(model: VisionLanguageModel, log: Callable[[str], None]) -> None:
    """Parameters per top-level module, and the trainable ones (LoRA counted apart)."""
    counts: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        totals[top] += p.numel()
        if p.requires_grad:
            counts[top + (" (lora)" if "lora_" in name else "")] += p.numel()
    for top in totals:
        log(f"  {top:<10} {totals[top]:>13,} parameters")
    for key, n in sorted(counts.items()):
        log(f"  trainable {key:<18} {n:>11,}")


def bad_rows_report(run: Run, everywhere: bool = False) -> SkipReport:
    """The rows found unusable while training, counted by reason, as a `SkipReport`: this process's, or with
    `everywhere` (a collective call: every process must make it) those of all processes."""
    bad = dict(run.bad)
    if everywhere and run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        for other in gather_object([run.bad]):
            bad |= other
    report = SkipReport("training rows", total=sum(len(data) for data in run.sources) - len(bad))
    for key in sorted(bad):
        report.add(*bad[key])
    return report


# -- evaluation ---------------------------------------------------------------------------------------------


def evaluate(
    model: VisionLanguageModel, kind: str, rows: list[dict], batch_size: int, out: Path | None
) -> dict[str, float]:
    """`data.eval`'s scores (`vlm.evaluate`): VQA accuracy, caption BLEU-4/CIDEr or chat answers; the
    predictions to `out` when given."""
    from vlm.evaluate import EVALUATORS

    return EVALUATORS[kind](model, rows, batch_size=batch_size, predictions_path=out).summary()


# -- the loop -------------------------------------------------------------------------------------------------


@dataclass
class Run(RunBase):
    """What the loop works on, from `setup`: the model as accelerate prepared it (`model`, DDP-wrapped with
    several processes) and unwrapped (`core`), the data, and the step reached."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    model: torch.nn.Module
    core: VisionLanguageModel
    settings: LoraSettings
    optimizer: torch.optim.Optimizer
    sources: list[Rows]  # per `data.train` source
    stream: Stream
    batches: StepBatches  # step -> this process's micro-batches (vlm.pipeline)
    workers: int  # processes building them ahead (0: this one, as it goes)
    metrics: MetricsLog
    eval_rows: list[dict] | None
    writer: SummaryWriter | None  # TensorBoard, on the main process when asked for
    step: int
    # rows found unusable when their batch was built: (source, row) -> (reason, detail); see vlm.pipeline
    bad: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    return run_script(list(sys.argv[1:] if argv is None else argv), __doc__, FinetuneConfig, train)


def train(cfg: FinetuneConfig, resume: bool = False) -> VisionLanguageModel:
    """Run (or continue) the fine-tuning described by `cfg`; returns the trained model (LoRA not merged)."""
    run = setup(cfg, resume)
    started = time.perf_counter()
    fit(run)
    ship(run, started)
    return run.core


def setup(cfg: FinetuneConfig, resume: bool) -> Run:
    """Model with LoRA, optimizer and data; from the newest checkpoint when there is one."""
    check_files(cfg)  # before anything loads
    sources, eval_source = open_sources(cfg)
    t = cfg.train
    accelerator = make_accelerator(t.bf16, t.seed)
    log, run_dir = accelerator.print, Path(t.out_dir)
    ckpt = resume_point(run_dir, resume, to_dict(cfg), log)
    # a checkpoint holds the whole model: its tower is not replaced by `model.vision` again
    model = build_model(replace(cfg, model=replace(cfg.model, init=str(ckpt), vision=None)) if ckpt else cfg)
    settings = lora_settings(cfg)
    make_trainable(model, settings, t.gradient_checkpointing)
    log_trainable(model, log)
    optimizer = build_optimizer(param_groups(model, t), t.optimizer, t.lr)
    step = resume_step(ckpt, optimizer, log)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    for source in sources:  # rows lost before training (a JSON file's unreadable lines, a packaged build's)
        log_skips(log, source.report)
    for i, source in enumerate(cfg.data.train):
        if cfg.data.eval is not None and reads_rows_of(cfg.data.eval.spec(), source.spec()):
            log(
                f"warning: data.eval reads rows data.train[{i}] trains on ({source.name}, split "
                f"{cfg.data.eval.split!r} of {source.split!r}): its score is not a held-out one; to hold rows "
                f"out, slice the split: data.eval split '{source.split}[:5%]', data.train split '{source.split}[5%:]'"
            )
    streamed = [i for i, source in enumerate(sources) if source.streaming]
    stream = Stream([len(s) for s in sources], [s.weight for s in cfg.data.train], t.seed, streamed)
    log(stream.describe(t.batch_size * accelerator.num_processes * t.grad_accum, t.steps))
    workers = (
        t.num_workers if t.num_workers is not None else default_workers(accelerator.device, bool(streamed))
    )
    prepared = None
    if cfg.data.prepare_ahead or (cfg.data.prepare_ahead is None and workers > 0):
        with accelerator.main_process_first():  # one process builds, the others open what it wrote
            prepared = prepare_ahead(sources, model.preparer, cfg.data.max_length, log=log)
    batches = StepBatches(
        sources, stream, model.preparer, batch_size=t.batch_size, grad_accum=t.grad_accum,
        world=accelerator.num_processes, rank=accelerator.process_index, max_length=cfg.data.max_length,
        seed=t.seed, cache_bytes=(2 << 30) // max(1, workers), pack=cfg.data.pack, prepared=prepared,
    )  # fmt: skip
    metrics = open_run_folder(run_dir, cfg, accelerator.is_main_process)
    eval_rows = eval_source.eval_rows() if eval_source is not None else None
    writer = None
    if t.tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run_dir / "tensorboard")
    return Run(
        cfg, accelerator, wrapped, accelerator.unwrap_model(wrapped), settings, optimizer, sources, stream,
        batches, workers, metrics, eval_rows, writer, step,
    )  # fmt: skip


def fit(run: Run) -> None:
    """Steps from `run.step` to `train.steps`: logging, checkpointing and (every `train.eval_every`)
    evaluating."""
    t, accelerator = run.cfg.train, run.accelerator
    run.model.train()
    progress = Progress(t.steps, run.step, "finetune", run.per_step, accelerator.is_local_main_process)
    pin = accelerator.device.type == "cuda"
    for item in step_loader(run.batches, run.step, t.steps, run.workers, pin_memory=pin):
        run.bad |= item.bad
        lr = cosine_lr(run.step, t.steps, t.warmup_steps, t.lr)
        set_lr(run.optimizer, lr)
        step_loss = train_step(run, item.batches)
        run.step += 1
        logging = due(run.step, t.log_every, t.steps)
        loss = float(step_loss) if logging else None  # the step's one wait for the accelerator, when logged
        rate = progress.update(loss, lr)
        if accelerator.is_main_process and logging:
            run.metrics.write(step=run.step, loss=loss, lr=lr, samples_per_s=rate)
            if run.writer is not None:
                run.writer.add_scalar("loss", loss, run.step)
        if due(run.step, t.checkpoint_every, t.steps):
            save_checkpoint(
                accelerator, run.dir, run.step, partial(save_vlm, run), run.optimizer,
                {"position": run.step * run.per_step}, to_dict(run.cfg),
            )  # fmt: skip
        if run.eval_rows is not None and due(run.step, t.eval_every, t.steps, at_last=False):
            evaluate_mid_run(run)
    progress.close()
    log_skips(run.log, bad_rows_report(run, everywhere=True))


def log_skips(log: Callable[[str], None], report: SkipReport | None) -> None:
    """A skip report's summary line and a few examples per reason, when it skipped anything."""
    if report is None or not report.skipped:
        return
    log(report.summary())
    for reason, details in report.examples.items():
        log(f"  {reason}, e.g. " + "; ".join(details))


def train_step(run: Run, batches: list[Batch]) -> torch.Tensor:
    """One optimizer step over this process's micro-batches; returns the step's loss per learned token over
    all processes (the loss scaling of the module docstring), as a tensor on the device.

    Nothing here waits for the accelerator: the learned tokens are counted on the CPU when the batches are
    built (`Batch.learned_index`), several processes add their counts with a collective on the device, and
    the loss is only read (`float`) by the caller at logging steps."""
    accelerator, device, world = run.accelerator, run.accelerator.device, run.accelerator.num_processes
    local = sum(b.num_learned for b in batches)
    if world > 1:  # learned tokens in the step over all processes, added on the device
        count = torch.tensor(float(local))
        total = accelerator.reduce(
            count.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else count.to(device),
            reduction="sum",
        )
        scale = world / total.clamp(min=1)
    else:
        scale = 1.0 / max(local, 1)
    non_blocking = device.type == "cuda"
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=non_blocking)
        with grad_sync(accelerator, run.model, last=i == len(batches) - 1), accelerator.autocast():
            out = run.model(
                batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum",
                image_index=batch.image_index, learned_index=batch.learned_index,
                learned_targets=batch.learned_targets, position_ids=batch.position_ids,
            )  # fmt: skip
            accelerator.backward(out.loss * scale)
        step_loss += out.loss.detach()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(step_loss)
    return step_loss * (scale / world)


def evaluate_mid_run(run: Run) -> None:
    """VQA accuracy on `data.eval` on the main process (the others wait), to metrics.jsonl and printed."""
    run.model.eval()
    if run.accelerator.is_main_process:
        summary = evaluate(
            run.core, run.cfg.data.eval.kind, run.eval_rows, run.cfg.train.eval_batch_size, None
        )
        run.metrics.write_eval(run.step, summary)
        run.log(f"step {run.step}: eval {summary}")
    run.accelerator.wait_for_everyone()
    run.model.train()


# -- saving -------------------------------------------------------------------------------------------------


def save_vlm(run: Run, folder: Path) -> None:
    """The model (`VisionLanguageModel.save_pretrained`) and its LoRA adapter in `folder/adapter`."""
    run.core.save_pretrained(folder)
    save_adapter(run.core, folder / "adapter", run.settings)


def ship(run: Run, started: float) -> None:
    """`final/`, then the final evaluation (predictions in `predictions.jsonl`), the curves and the model card
    (its training time counted from `started`)."""
    run.model.eval()
    if run.accelerator.is_main_process:
        final = run.dir / "final"
        save_vlm(run, final)
        summary = {}
        if run.eval_rows is not None:
            summary = evaluate(
                run.core,
                run.cfg.data.eval.kind,
                run.eval_rows,
                run.cfg.train.eval_batch_size,
                run.dir / "predictions.jsonl",
            )
            run.metrics.write_eval(run.step, summary)
            run.log(f"final eval: {summary}")
        plot_curves(
            run.metrics.read(),
            run.dir / "curves.png",
            ("loss", "eval_accuracy", "eval_cider"),
            f"finetune {run.dir.name}",
        )
        write_model_card(
            final, run.cfg, run.core.config.lm_source, run.step, run.per_step, summary,
            time.perf_counter() - started,
        )  # fmt: skip
        run.log(f"model saved to {final}")
    run.accelerator.wait_for_everyone()


def write_model_card(
    folder: Path, cfg: FinetuneConfig, lm: str, steps: int, per_step: int, summary: dict, seconds: float
) -> None:
    """`README.md`: what the model is made of and how it was trained. `lm` is the model's own LM source: a run
    that continues a saved model (`model.init`) has that model's LM and tower, not `cfg.model`'s."""
    m = cfg.model
    tower = m.vision or (f"from {m.init}" if m.init else "trained from scratch here")
    sources = ", ".join(f"{s.kind}:{s.name}[{s.split}]" for s in cfg.data.train)
    lines = [
        "---",  # Hugging Face model-card front matter; the demo shows `datasets` as "trained on"
        "library_name: vlm",
        f"datasets: [{', '.join(sorted({s.name for s in cfg.data.train}))}]",
        "---",
        f"# {folder.parent.name}",
        "",
        f"- base LM: `{lm}` (LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}; target `{cfg.lora.target}`)",
        f"- vision tower: {tower} ({m.train_vision})",
        f"- data: {sources}",
        f"- steps: {steps} x {per_step} samples; training time {seconds / 60:.1f} min",
        f"- evaluation ({cfg.data.eval.name if cfg.data.eval else 'none'}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()),
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
