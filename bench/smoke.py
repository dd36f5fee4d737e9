"""The tiny random stand-ins every benchmark's `--smoke` mode runs (tests/test_bench.py runs them all): the same
code paths and tables as a real run, in seconds; their figures mean nothing."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlm.lm import DEFAULT_LM, resolve_lm_source
from vlm.model import DEFAULT_CONFIG, VisionLanguageModel
from vlm.siglip import SiglipVisionConfig

# a 4x4 grid, pixel-shuffled to 4 tokens + the pooled one, as the default's 8x8 grid is to 16 + 1
TOWER = SiglipVisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)  # fmt: skip


def default_model(dtype: torch.dtype = torch.float32) -> VisionLanguageModel:
    """The default model's design (pixel shuffle f=2, pooled token, its system prompt) at a tiny random size:
    a 2-layer Llama with SmolLM2's tokenizer (the one file read: no GGUF weights, no default model)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_lm_source(DEFAULT_LM))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    lm = LlamaForCausalLM(config).eval()
    projector = replace(DEFAULT_CONFIG.projector, vision_hidden_size=TOWER.hidden_size, text_hidden_size=48)
    vlm_config = replace(DEFAULT_CONFIG, vision=TOWER, projector=projector)
    return VisionLanguageModel.build(vlm_config, dtype, lm=(lm.to(dtype), tokenizer))
