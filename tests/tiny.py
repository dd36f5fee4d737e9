"""A tiny random VLM for tests: tiny Llama LM (SmolLM2's real tokenizer) + tiny SigLIP tower."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from vlm.lora import LoraSettings, save_adapter
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.projector import ProjectorConfig
from vlm.siglip import SiglipVisionConfig

VISION = SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def tiny_lm(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    lm = LlamaForCausalLM(config).eval()
    # Large random weights: with HF's small init every prompt greedily decodes to the same token, and the
    # cache/batching/streaming comparisons below could not fail. These decode to varied, input-dependent text.
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return lm


def build(parts, **overrides) -> VisionLanguageModel:
    lm, tokenizer = parts
    projector = ProjectorConfig(VISION.hidden_size, lm.config.hidden_size, **overrides.pop("projector", {}))
    config = VLMConfig(vision=VISION, projector=projector, lm_source="unused-in-tests", **overrides)
    torch.manual_seed(2)
    return VisionLanguageModel.build(config, lm=(copy.deepcopy(lm), copy.deepcopy(tokenizer)))


def save_vlm(model: VisionLanguageModel, folder: Path, lm: Path, lora: LoraSettings | None = None) -> Path:
    """`model` saved to `folder` so that it reloads: its config names the folder `lm` as its LM (a tiny model
    is built around LM parts, not from a source), and with `lora` its adapter goes to `folder/adapter`."""
    model.save_pretrained(folder)
    if lora is not None:
        save_adapter(model, folder / "adapter", lora)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lm_source": str(lm)}))
    return folder


def images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    return [Image.new("RGB", (40 + 8 * i, 30), colours[i % 4]) for i in range(n)]


def image_sources(folder: Path) -> list:
    """11 image sources over 4 images, as a path (str and Path), PIL images and PNG bytes, several per image:
    batches over them are padded, reordered and share images across batch boundaries."""
    red, blue, green, yellow = images(4)
    red_path = folder / "red.png"
    red.save(red_path)
    buffer = io.BytesIO()
    yellow.save(buffer, format="PNG")
    sources = [str(red_path), blue, green, buffer.getvalue(), blue, str(red_path), green, blue, red_path]
    return sources + [buffer.getvalue(), green]
