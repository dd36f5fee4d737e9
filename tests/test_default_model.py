"""The shipped default model (vlm/default_model/): a regression guard on its easy-VQA accuracy, and chat."""

from __future__ import annotations

import json

import pytest

from vlm.data import load_easy_vqa_rows
from vlm.evaluate import evaluate_vqa
from vlm.model import DEFAULT_CONFIG, DEFAULT_MODEL_DIR, VLMConfig, load_default_model

CARD = DEFAULT_MODEL_DIR / "eval.json"


@pytest.fixture(scope="module")
def model(smollm2_folder):
    assert (DEFAULT_MODEL_DIR / "config.json").is_file(), "the default model ships with the package"
    return load_default_model()


def test_it_is_the_trained_model(model) -> None:
    from vlm.lora import lora_modules

    assert lora_modules(model), "the shipped model carries its LoRA adapter"
    assert model.config.projector.pooled_token and model.tokens_per_image == 16 + 1


def test_default_config_describes_the_shipped_model() -> None:
    # DEFAULT_CONFIG is the fallback when no model ships and the tower shape bench/train_step.py measures.
    shipped = VLMConfig.from_dict(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    for field in ("vision", "projector"):
        assert getattr(shipped, field).to_dict() == getattr(DEFAULT_CONFIG, field).to_dict(), field
    assert (shipped.lm_source, shipped.system_prompt) == (
        DEFAULT_CONFIG.lm_source,
        DEFAULT_CONFIG.system_prompt,
    )


def test_accuracy_on_a_fixed_sample_holds_what_the_card_states(model) -> None:
    card = json.loads(CARD.read_text())
    result = evaluate_vqa(model, load_easy_vqa_rows("test", limit=240, seed=1), batch_size=80, progress=False)
    assert result.metrics["accuracy"] >= card["accuracy"] - 0.02, (result.report(), card)


def test_it_still_chats_about_text(model) -> None:
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=20)
