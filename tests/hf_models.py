"""Tiny random reference models from `transformers`, built in the test run (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import SiglipConfig, SiglipModel, SiglipVisionModel
from transformers import SiglipVisionConfig as HFVisionConfig

TINY: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=99,
    max_position_embeddings=8,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, biases and layer norms included: HF's init leaves those at 0 and 1,
    which would hide a swapped bias or a missing layer-norm weight from a parity test."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def hf_vision(attn: str = "eager", **overrides: Any) -> SiglipVisionModel:
    config = HFVisionConfig(**{**TINY, **overrides})
    config._attn_implementation = attn
    return randomize_(SiglipVisionModel(config)).eval()


def hf_siglip(**vision_overrides: Any) -> SiglipModel:
    config = SiglipConfig(text_config=TINY_TEXT, vision_config={**TINY, **vision_overrides})
    model = SiglipModel(config)
    model.set_attn_implementation("eager")  # so the reference can return attention weights
    return randomize_(model).eval()


def save(model: torch.nn.Module, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(path, **kwargs)
    return path
