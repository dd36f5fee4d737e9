"""QLoRA end to end on the CPU: a tiny random LM fine-tuned in 4-bit through train/finetune.py, then reloaded,
loaded other ways and merged.

A LoRA adapter trained against 4-bit weights is tuned to their rounding: reloaded over the full-precision LM it
answered differently (on a GPU, 82.8% VQA accuracy fell to 62.2%). So the model records the bitsandbytes
settings in its config.json, `from_pretrained` applies them unless told otherwise (and warns when told), and
`vlm merge` dequantises before adding the LoRA update. bitsandbytes quantises on the CPU, the tiny LM included
(its widths, 48 and 96, are whole 64-value nf4 blocks)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from needs import pin_cpu
from scripts import load_script
from tiny import images

from vlm.checks import CheckpointError
from vlm.cli import main
from vlm.config import load_config
from vlm.conversation import user
from vlm.lm import LMQuantization, quantization_of
from vlm.lora import lora_modules
from vlm.model import VisionLanguageModel, VLMConfig

bnb = pytest.importorskip("bitsandbytes")
ft = load_script("finetune")

# How far the merged model's logits may move from the 4-bit model's with its adapter: the same products summed
# in another order (dequant(W) + BA folded into one matrix), amplified by the tiny LM's large random weights
# to ~1e-4 on logits of magnitude ~10 (measured up to 1.3e-4). A merge that re-quantised the sum, or dropped
# the update, is off by more than 0.1.
MERGE_ATOL = 5e-4


@pytest.fixture(scope="module")
def trained(parts, tmp_path_factory) -> tuple[VisionLanguageModel, Path]:
    """(the model train/finetune.py returns, its saved `final/` folder): 3 steps with the LM in 4-bit."""
    root = tmp_path_factory.mktemp("qlora")
    lm, tokenizer = parts
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    overrides = [
        f"--model.lm={root / 'lm'}", "--model.quantization=4bit", "--model.image_size=32",
        "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
        "--model.num_attention_heads=2", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0",
        "--data.train=[{kind: vqa, name: easy-vqa, limit: 8}]", "--data.eval=null",
        f"--train.out_dir={root / 'run'}", "--train.steps=3", "--train.batch_size=4", "--train.warmup_steps=1",
        "--train.lr=5e-2", "--train.bf16=false", "--train.checkpoint_every=100",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as monkeypatch:
        pin_cpu(monkeypatch)
        monkeypatch.setenv("VLM_CACHE", str(root / "cache"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # bitsandbytes would pick a GPU
        model = ft.train(load_config(ft.FinetuneConfig, None, overrides))
    return model.eval(), root / "run" / "final"


@pytest.fixture(autouse=True)
def _cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def logits(model: VisionLanguageModel) -> torch.Tensor:
    """Logits over two image questions, with the adapter on: (2, L, V)."""
    conversations = [[user("What shape is it?", images(1))], [user("What colour?", images(2))]]
    batch = model.prepare(conversations, for_generation=True)
    model.eval()
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits


def is_4bit(model: VisionLanguageModel) -> bool:
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.lm.modules())


def test_the_saved_config_records_the_settings_the_lm_was_quantised_with(trained) -> None:
    model, final = trained
    assert is_4bit(model) and lora_modules(model)
    recorded = json.loads((final / "config.json").read_text())["quantization"]
    # Exactly what load_lm handed to transformers, read back from the loaded LM.
    assert LMQuantization.from_dict(recorded) == quantization_of(model.lm) == model.config.quantization
    assert recorded["load_in_4bit"] and not recorded["load_in_8bit"]
    assert (recorded["bnb_4bit_quant_type"], recorded["bnb_4bit_use_double_quant"]) == ("nf4", True)
    assert recorded["bnb_4bit_compute_dtype"] == "float32"
    assert (
        LMQuantization.from_dict(recorded).to_bnb().to_dict() == model.lm.config.quantization_config.to_dict()
    )


def test_reloading_with_no_argument_loads_the_lm_in_4bit_as_trained(trained, caplog) -> None:
    model, final = trained
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        again = VisionLanguageModel.from_pretrained(final)
    assert is_4bit(again) and again.config.quantization == model.config.quantization
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    (record,) = [r for r in caplog.records if r.name == "vlm.lm"]
    assert record.levelno == logging.INFO
    assert "the LM is loaded in 4-bit" in record.message and "as it was trained" in record.message
    assert "quantization=None for full precision" in record.message


@pytest.mark.parametrize("quantization,loaded", [(None, "in full precision"), ("8bit", "in 8-bit")])
def test_loading_another_way_warns_that_answers_will_differ(trained, caplog, quantization, loaded) -> None:
    model, final = trained
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        other = VisionLanguageModel.from_pretrained(final, quantization=quantization)
    assert not is_4bit(other)
    assert (other.config.quantization and other.config.quantization.bits) == quantization  # what it is now
    (record,) = [r for r in caplog.records if r.name == "vlm.lm"]
    assert record.levelno == logging.WARNING
    assert f"loaded {loaded}" in record.message and "trained in 4-bit" in record.message
    assert "answers will differ from the ones measured in training" in record.message
    assert (logits(other) - logits(model)).abs().max() > 0.1  # the 4-bit rounding matters


def test_asking_for_4bit_by_name_applies_the_recorded_settings(trained, caplog) -> None:
    model, final = trained
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        again = VisionLanguageModel.from_pretrained(final, quantization="4bit", dtype=torch.float32)
    assert again.config.quantization == model.config.quantization
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_old_config_without_the_field_loads_in_full_precision_as_before(trained, tmp_path, caplog) -> None:
    _, final = trained
    old = shutil.copytree(final, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    del config["quantization"]
    (old / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        loaded = VisionLanguageModel.from_pretrained(old)
    assert not is_4bit(loaded) and loaded.config.quantization is None
    assert not [r for r in caplog.records if r.name == "vlm.lm"]  # nothing recorded, nothing to say
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        full = VisionLanguageModel.from_pretrained(final, quantization=None)
    torch.testing.assert_close(logits(loaded), logits(full), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "resaved")  # saved again: it records what it now is
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization"] is None


def test_vlm_merge_of_a_qlora_model_is_full_precision_and_close_to_the_4bit_one(
    trained, tmp_path, capsys
) -> None:
    model, final = trained
    assert main(["merge", str(final), str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "merged in full precision from a model trained against its LM in 4-bit (nf4" in out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["quantization"] is None
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "lm" / "config.json").read_text())
    assert "trained against its LM in 4-bit" in (tmp_path / "merged" / "README.md").read_text()
    merged = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert not is_4bit(merged) and not lora_modules(merged) and merged.config.quantization is None
    want, got = logits(model), logits(merged)
    torch.testing.assert_close(got, want, rtol=0, atol=MERGE_ATOL)
    prompt = [[user("What shape is it?", images(1))]]
    assert merged.generate(prompt, max_new_tokens=6) == model.generate(prompt, max_new_tokens=6)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(bnb_4bit_quant_type="nf5"), "quantization.bnb_4bit_quant_type must be one of"),
        (dict(load_in_8bit=True), "exactly one of load_in_4bit and load_in_8bit"),
        (dict(bnb_4bit_compute_dtype="float33"), "must name a torch dtype"),
        (dict(bogus=1), "quantization has unknown keys: bogus"),
    ],
)
def test_a_bad_quantization_record_names_the_key(change, message) -> None:
    from vlm.projector import ProjectorConfig
    from vlm.siglip import SiglipVisionConfig

    settings = LMQuantization.named("4bit", torch.float32)
    config = VLMConfig(SiglipVisionConfig(), ProjectorConfig(768, 576), quantization=settings)
    d = config.to_dict()
    assert VLMConfig.from_dict(d) == config
    d["quantization"] = {**d["quantization"], **change}
    with pytest.raises(CheckpointError, match=message):
        VLMConfig.from_dict(d)


def test_vlm_ask_answers_as_trained_unless_told_quantize_none(trained, capsys, caplog) -> None:
    model, final = trained
    picture = final.parent / "picture.png"
    images(1)[0].save(picture)
    argv = [
        "ask",
        "What shape is it?",
        "--model",
        str(final),
        "--image",
        str(picture),
        "--max-new-tokens",
        "4",
    ]
    with caplog.at_level(logging.INFO, logger="vlm.lm"):
        assert main(argv) == 0
        assert capsys.readouterr().out == model.ask(picture, "What shape is it?", max_new_tokens=4) + "\n"
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert main([*argv, "--quantize", "none"]) == 0
    assert "loaded in full precision" in caplog.records[-1].message
    assert caplog.records[-1].levelno == logging.WARNING
