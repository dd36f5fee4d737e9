"""Fine-tune a VisionLanguageModel for VQA and captioning: projector fully, the LM through LoRA (peft).

    python train/finetune.py configs/easyvqa_offline.yaml [--train.steps=200] [--resume]
    accelerate launch --num_processes 2 train/finetune.py CONFIG      # DDP (CPU: gloo, GPU: NCCL)

One flat loop: setup -> fit -> evaluate. accelerate does devices and processes; peft does LoRA; datasets
holds the data. Re-running the same command (or --resume) continues from the newest complete checkpoint
in the run folder: model, optimizer, RNG and data position are restored, so a run killed with SIGKILL ends
where an uninterrupted one would.

Loss scaling: each micro-batch contributes the SUM of its learned tokens' cross-entropies divided by the
number of learned tokens in the whole optimizer step across all processes (counted before the forward
passes), times the number of processes because DDP averages gradients. So one step on N processes equals
one step on one process over the same global batch, whatever the padding or answer lengths.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from vlm.config import dump, to_dict  # noqa: E402
from vlm.data.vqa import build_easy_vqa_questions, from_jsonl_vqa, to_conversation  # noqa: E402
from vlm.lm import DEFAULT_LM  # noqa: E402
from vlm.lora import LM_ALL_LINEAR, LoraSettings, add_lora, lora_modules, save_adapter  # noqa: E402
from vlm.model import VisionLanguageModel, VLMConfig  # noqa: E402
from vlm.projector import ProjectorConfig  # noqa: E402
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder  # noqa: E402
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

# -- config ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection:
    init: str | None = None  # a saved VLM folder to continue from; else one is built from the fields below
    vision: str | None = None  # a SigLIP checkpoint (hub id or folder) for the tower; else a fresh tower
    image_size: int = 64  # fresh tower only
    patch_size: int = 8
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 3
    projector: Literal["linear", "mlp", "pixel_shuffle"] = "pixel_shuffle"
    scale_factor: int = 2
    # Also the tower's pooled embedding, as one more image token (vlm/projector.py).
    pooled_token: bool = False
    lm: str = DEFAULT_LM
    quantization: Literal["4bit", "8bit"] | None = None  # QLoRA: the frozen LM in 4-bit
    vision_feature_layer: int = -1
    system_prompt: str | None = None
    adapter_on_text: bool = True  # False: text-only chat bypasses LoRA (VLMConfig.adapter_on_text)
    train_vision: Literal["frozen", "full", "lora"] = "frozen"


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target: str = LM_ALL_LINEAR  # regex over full module names; with train_vision=lora the tower's q/v join


@dataclass(frozen=True)
class Source:
    kind: Literal["vqa", "caption"]
    name: str  # "easy-vqa", a JSONL file, or (captions) a vlm.data.sources builder: emoji, flags, ...
    split: str = "train"
    limit: int | None = None
    weight: float = 1.0  # how many times each row is seen per epoch (fractions subsample)


@dataclass(frozen=True)
class DataSection:
    train: tuple[Source, ...] = (Source(kind="vqa", name="easy-vqa"),)
    eval: Source | None = Source(kind="vqa", name="easy-vqa", split="test", limit=500)
    max_length: int = 512  # longer conversations are skipped and counted


@dataclass(frozen=True)
class TrainSection:
    out_dir: str = "runs/finetune"
    steps: int = 1000
    batch_size: int = 16  # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-4  # LoRA
    lr_projector: float = 1e-3
    lr_vision: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    bf16: bool = True  # autocast where the device supports bf16 (CPU with AVX-512/AMX, Ampere+ GPUs)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 64
    log_every: int = 10
    seed: int = 0
    tensorboard: bool = False


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


# -- setup -------------------------------------------------------------------------------------------------


def build_model(cfg: FinetuneConfig) -> VisionLanguageModel:
    m = cfg.model
    freeze = ("lm",) if m.train_vision == "full" else ("vision", "lm")
    if m.init is not None:  # its adapter/, when there is one, comes with it
        model = VisionLanguageModel.from_pretrained(m.init, quantization=m.quantization)
        model.config = replace(model.config, freeze=freeze)
        return model
    vision = SiglipVisionEncoder.from_pretrained(m.vision) if m.vision else None
    vision_config = vision.config if vision is not None else SiglipVisionConfig(
        hidden_size=m.hidden_size, intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads, image_size=m.image_size, patch_size=m.patch_size,
    )  # fmt: skip
    from vlm.lm import load_lm

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
    )
    model = VisionLanguageModel.build(config, lm=(lm, tokenizer))
    if vision is not None:
        model.vision.load_state_dict(vision.state_dict())
    return model


def lora_settings(cfg: FinetuneConfig) -> LoraSettings:
    target = cfg.lora.target
    if cfg.model.train_vision == "lora":
        target += r"|vision\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj"
    return LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, target)


def load_source(source: Source):
    if source.kind == "vqa":
        if source.name == "easy-vqa":
            return build_easy_vqa_questions(source.split, limit=source.limit)
        return from_jsonl_vqa(source.name)
    from vlm.data.pairs import from_jsonl
    from vlm.data.sources import SOURCES

    if source.name in SOURCES:
        return SOURCES[source.name](split=source.split, limit=source.limit)
    return from_jsonl(source.name)


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


def log_trainable(model: VisionLanguageModel, log) -> None:
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


def prepare_skipping(model: VisionLanguageModel, conversations: list, max_length: int, skipped: Counter):
    """`model.prepare`, dropping (and counting) conversations that cannot be used: an unreadable image, an
    empty turn, or more than `max_length` tokens. A bad row never stops a run."""
    try:
        return model.prepare(conversations, max_length=max_length)
    except ValueError:
        good = []
        for conversation in conversations:
            try:
                model.prepare([conversation], max_length=max_length)
                good.append(conversation)
            except ValueError as err:
                skipped[str(err).split(":")[-1].strip()[:60]] += 1
        if not good:
            raise ValueError("a whole micro-batch was unusable; check the data") from None
        return model.prepare(good, max_length=max_length)


# -- evaluation ---------------------------------------------------------------------------------------------


def load_eval_rows(source: Source) -> list[dict]:
    """Evaluation rows keep image paths (not decoded images) so the evaluator can encode each image once."""
    from vlm.evaluate import load_easy_vqa_rows, load_jsonl_rows

    if source.kind != "vqa":
        raise ValueError(
            "evaluation during fine-tuning is VQA accuracy; use `vlm eval --task caption` for captions"
        )
    if source.name == "easy-vqa":
        return load_easy_vqa_rows(source.split, limit=source.limit)
    return load_jsonl_rows(source.name, limit=source.limit)


def evaluate(model: VisionLanguageModel, rows, batch_size: int, out: Path | None) -> dict[str, float]:
    from vlm.evaluate import evaluate_vqa

    result = evaluate_vqa(model, rows, batch_size=batch_size, predictions_path=out)
    return result.summary()


# -- the loop -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    return run_script(list(sys.argv[1:] if argv is None else argv), __doc__, FinetuneConfig, train)


def train(cfg: FinetuneConfig, resume: bool = False) -> VisionLanguageModel:
    """Run (or continue) the fine-tuning described by `cfg`; returns the trained model (LoRA not merged)."""
    from accelerate import Accelerator

    t = cfg.train
    # cpu=True on a machine without CUDA: accelerate then treats torchrun's WORLD_SIZE > 1 as multi-process
    # CPU (gloo); without it each process would train alone.
    accelerator = Accelerator(mixed_precision="bf16" if t.bf16 else "no", cpu=not torch.cuda.is_available())
    log = accelerator.print
    run = Path(t.out_dir)
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # setup
    ckpt = latest_checkpoint(run, log) if (resume or run.exists()) else None
    if ckpt is not None:
        check_resumable(ckpt, to_dict(cfg))
    model = build_model(replace(cfg, model=replace(cfg.model, init=str(ckpt))) if ckpt else cfg)
    settings = lora_settings(cfg)
    if not lora_modules(model):  # a checkpoint or an `init` folder brings its adapter along
        add_lora(model, settings)
    model.freeze(model.config.freeze)  # then the LoRA weights train, whatever they sit under
    for name, p in model.named_parameters():
        p.requires_grad |= "lora_" in name
    if t.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log_trainable(model, log)
    groups = param_groups(model, t)
    optimizer = (
        torch.optim.AdamW(groups, lr=t.lr) if t.optimizer == "adamw" else torch.optim.SGD(groups, lr=t.lr)
    )
    step = 0
    if ckpt is not None:
        meta = load_training_state(ckpt, optimizer)
        step = meta["step"]
        log(f"resumed from {ckpt} at step {step}")
    model, optimizer = accelerator.prepare(model, optimizer)
    core: VisionLanguageModel = accelerator.unwrap_model(model)

    sources = [load_source(s) for s in cfg.data.train]
    stream = Stream([len(s) for s in sources], [s.weight for s in cfg.data.train], t.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = t.batch_size * world * t.grad_accum
    log(
        f"{stream.epoch_len:,} rows an epoch; {per_step} a step; {t.steps} steps = {t.steps * per_step / stream.epoch_len:.2f} epochs"
    )
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        dump(cfg, run / "config.yaml")
    metrics = MetricsLog(run / "metrics.jsonl")
    eval_rows = load_eval_rows(cfg.data.eval) if cfg.data.eval is not None else None
    writer = None
    if t.tensorboard and accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(run / "tensorboard")

    def micro_batches(position: int) -> list:
        """This step's micro-batches for this process, each a prepared Batch; bad rows dropped and counted."""
        batches = []
        for micro in range(t.grad_accum):
            pairs = stream.take(position + micro * t.batch_size * world, t.batch_size * world)
            mine = pairs[rank * t.batch_size : (rank + 1) * t.batch_size]
            conversations = [to_conversation(sources[s][r]) for s, r in mine]
            batches.append(prepare_skipping(core, conversations, cfg.data.max_length, skipped))
        return batches

    skipped: Counter[str] = Counter()

    def save(at: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:

            def write_model(folder: Path) -> None:
                core.save_pretrained(folder)
                save_adapter(core, folder / "adapter", settings)

            save_training_checkpoint(
                run, at, write_model, optimizer, {"position": at * per_step}, to_dict(cfg)
            )
        accelerator.wait_for_everyone()

    # fit
    model.train()
    bar = tqdm(total=t.steps, initial=step, desc="finetune", disable=not accelerator.is_local_main_process)
    started, seen = time.perf_counter(), 0
    while step < t.steps:
        lr = cosine_lr(step, t.steps, t.warmup_steps, t.lr)
        set_lr(optimizer, lr)
        batches = micro_batches(step * per_step)
        local = torch.tensor(
            sum(int((b.labels[:, 1:] != -100).sum()) for b in batches), device=accelerator.device
        )
        total = accelerator.reduce(local, reduction="sum") if world > 1 else local
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            batch = batch.to(accelerator.device)
            sync = i == len(batches) - 1
            with (
                accelerator.no_sync(model) if not sync and world > 1 else nullcontext(),
                accelerator.autocast(),
            ):
                out = model(
                    batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum"
                )
                loss = out.loss * world / total.clamp(min=1)
                accelerator.backward(loss)
            step_loss += out.loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seen += per_step
        if world > 1:
            dist.all_reduce(step_loss)
        mean_loss = float(step_loss / total.clamp(min=1))
        bar.update(1)
        bar.set_postfix(
            loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", it_s=f"{seen / (time.perf_counter() - started):.1f}"
        )
        if accelerator.is_main_process and (step % t.log_every == 0 or step == t.steps):
            metrics.write(
                step=step, loss=mean_loss, lr=lr, samples_per_s=seen / (time.perf_counter() - started)
            )
            if writer is not None:
                writer.add_scalar("loss", mean_loss, step)
        if step % t.checkpoint_every == 0 or step == t.steps:
            save(step)
        if eval_rows is not None and t.eval_every and step % t.eval_every == 0 and step != t.steps:
            model.eval()
            if accelerator.is_main_process:
                summary = evaluate(core, eval_rows, t.eval_batch_size, None)
                metrics.write(step=step, **{f"eval_{k}": v for k, v in summary.items()})
                log(f"step {step}: eval {summary}")
            accelerator.wait_for_everyone()
            model.train()
    bar.close()
    if skipped:
        log(
            f"skipped {sum(skipped.values())} bad rows: "
            + ", ".join(f"{n} {why}" for why, n in skipped.items())
        )

    # evaluate and ship
    model.eval()
    if accelerator.is_main_process:
        final = run / "final"
        core.save_pretrained(final)
        save_adapter(core, final / "adapter", settings)
        summary = {}
        if eval_rows is not None:
            summary = evaluate(core, eval_rows, t.eval_batch_size, run / "predictions.jsonl")
            metrics.write(step=step, **{f"eval_{k}": v for k, v in summary.items()})
            log(f"final eval: {summary}")
        plot_curves(metrics.read(), run / "curves.png", ("loss", "eval_accuracy"), f"finetune {run.name}")
        write_model_card(final, cfg, step, per_step, summary, time.perf_counter() - started)
        log(f"model saved to {final}")
    accelerator.wait_for_everyone()
    return core


def write_model_card(
    folder: Path, cfg: FinetuneConfig, steps: int, per_step: int, summary: dict, seconds: float
) -> None:
    sources = ", ".join(f"{s.kind}:{s.name}[{s.split}]" for s in cfg.data.train)
    lines = [
        "---",  # Hugging Face model-card front matter; the demo shows `datasets` as "trained on"
        "library_name: vlm",
        f"datasets: [{', '.join(sorted({s.name for s in cfg.data.train}))}]",
        "---",
        f"# {folder.parent.name}",
        "",
        f"- base LM: `{cfg.model.lm}` (LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}; target `{cfg.lora.target}`)",
        f"- vision tower: {cfg.model.vision or 'trained from scratch here'} ({cfg.model.train_vision})",
        f"- data: {sources}",
        f"- steps: {steps} x {per_step} samples; training time {seconds / 60:.1f} min",
        f"- evaluation ({cfg.data.eval.name if cfg.data.eval else 'none'}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()),
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
