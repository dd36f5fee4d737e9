"""LoRA through peft on the VLM: targeting by regex, what trains, adapter save/load, merging."""

from __future__ import annotations

import pytest
import torch
from tiny import build, images

from vlm.conversation import user
from vlm.lora import (
    LM_ALL_LINEAR,
    LoraSettings,
    add_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    save_merged,
)
from vlm.weights import CheckpointError


def batch_of(vlm):
    return vlm.prepare([[user("What is it?", images(1)), {"role": "assistant", "content": "A red square."}]])


def randomize_lora_(vlm) -> None:
    """peft starts B at zero (the adapter is a no-op); give it weight so the tests below can fail."""
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)


def test_lora_lands_only_where_the_regex_says(parts) -> None:
    vlm = build(parts)
    adapted = add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert len(adapted) == 2 * 7 and all(name.startswith("lm.model.layers.") for name in adapted)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)


def test_vision_lora_only_when_asked(parts) -> None:
    vlm = build(parts)
    target = LM_ALL_LINEAR + r"|vision\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj"
    adapted = add_lora(vlm, LoraSettings(r=2, alpha=4, target=target))
    assert sum(name.startswith("vision.") for name in adapted) == 4
    with pytest.raises(ValueError, match="matches no module"):
        add_lora(build(parts), LoraSettings(target=r"lm\.nothing_here"))


def test_training_changes_only_lora_and_projector(parts) -> None:
    vlm = build(parts)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_of(vlm)
    vlm.train()
    losses = []
    for _ in range(3):
        loss = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("projector.") for n in changed)
    assert any("lora_B" in n for n in changed)


def test_adapter_saves_loads_and_merges_to_the_same_logits(parts, tmp_path) -> None:
    vlm = build(parts)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    add_lora(vlm, settings)
    randomize_lora_(vlm)
    vlm.eval()
    batch = batch_of(vlm)
    with torch.no_grad():
        want = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    save_adapter(vlm, tmp_path / "adapter", settings)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    fresh = build(parts)  # the same seeds: same tower, projector and LM as `vlm` before LoRA
    fresh.projector.load_state_dict(vlm.projector.state_dict())
    with torch.no_grad():
        plain = fresh(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters
    assert load_adapter(fresh, tmp_path / "adapter") == settings
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(batch.input_ids, batch.attention_mask, batch.pixel_values).logits, want
        )
        merge_lora(fresh)
        assert lora_modules(fresh) == []
        merged = fresh(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    # W + BA folded into one matrix rounds differently from W x + B(A x); the tiny LM's large random weights
    # amplify that fp32 noise to ~3e-5 on logits of magnitude ~10. An unmerged or wrong merge is off by > 1e-3.
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=1e-4)


def test_merged_standalone_folder_loads_without_the_adapter(parts, tmp_path) -> None:
    from vlm.model import VisionLanguageModel

    vlm = build(parts)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_lora_(vlm)
    vlm.eval()
    batch = batch_of(vlm)
    with torch.no_grad():
        want = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    save_merged(vlm, tmp_path / "merged")
    assert (tmp_path / "merged" / "lm" / "config.json").is_file() and not (
        tmp_path / "merged" / "adapter"
    ).exists()
    again = VisionLanguageModel.from_pretrained(tmp_path / "merged")
    assert lora_modules(again) == []
    with torch.no_grad():
        got = again(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_not_an_adapter_folder(parts, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a LoRA adapter folder"):
        load_adapter(build(parts), tmp_path)


def test_an_adapter_whose_weights_do_not_fit_its_config_is_refused_in_one_line(parts, tmp_path) -> None:
    """An adapter_config.json that records another rank than its weights were trained with (as a run that
    saved its config's settings over the adapter it was given once did) is a CheckpointError naming the
    folder and a mismatched tensor, not torch's page of size mismatches."""
    vlm = build(parts)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    save_adapter(vlm, tmp_path / "adapter", LoraSettings(r=2, alpha=4, dropout=0.0))
    with pytest.raises(
        CheckpointError, match=r"do not fit its adapter_config.json \(r=2\): size mismatch"
    ) as err:
        load_adapter(build(parts), tmp_path / "adapter")
    assert str(tmp_path / "adapter") in str(err.value) and "\n" not in str(err.value)


def test_an_adapter_already_there_is_compared_with_the_settings_of_a_run(parts) -> None:
    """`adapter_differences`: nothing when rank, alpha and target agree; each that differs, named."""
    from vlm.lora import adapter_differences

    vlm = build(parts)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    add_lora(vlm, settings)
    assert adapter_differences(vlm, settings) == []
    assert adapter_differences(vlm, LoraSettings(r=4, alpha=8, dropout=0.3)) == []  # dropout is the run's
    assert adapter_differences(vlm, LoraSettings(r=8, alpha=16)) == ["r 4, not 8", "alpha 8, not 16"]
    (target,) = adapter_differences(
        vlm, LoraSettings(r=4, alpha=8, target=r"lm\.model\.layers\.0\.mlp\.up_proj")
    )
    assert target.startswith("target: 0 modules it lacks () and 13 the target would not adapt")


def test_adapter_on_text_false_leaves_text_only_chat_to_the_base_lm(parts) -> None:
    base = build(parts)  # the same seed: the same tower, projector and LM, and no adapter
    vlm = build(parts, adapter_on_text=False)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_lora_(vlm)
    flags = {n: p.requires_grad for n, p in vlm.named_parameters()}
    text = [[user("Tell me a story.")]]
    assert vlm.generate(text, max_new_tokens=12) == base.generate(text, max_new_tokens=12)
    assert {n: p.requires_grad for n, p in vlm.named_parameters()} == flags  # the adapter is back, as it was
    seen = [[user("Tell me a story.", images(1))]]
    assert vlm.generate(seen, max_new_tokens=12) != base.generate(seen, max_new_tokens=12)  # on with an image
    with_adapter = build(parts)
    add_lora(with_adapter, LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_lora_(with_adapter)
    assert with_adapter.generate(text, max_new_tokens=12) != base.generate(text, max_new_tokens=12)


def test_evaluation_follows_adapter_on_text_row_by_row(parts) -> None:
    vlm = build(parts, adapter_on_text=False)
    add_lora(vlm, LoraSettings(r=4, alpha=8, dropout=0.0))
    randomize_lora_(vlm)
    prompts = ["What is it?", "Tell me a story.", "What colour?", "Say hi."]
    sources = [images(1)[0], None, images(2)[1], None]
    one_by_one = [
        vlm.generate([[user(p, [s] if s else [])]], max_new_tokens=8)[0]
        for p, s in zip(prompts, sources, strict=True)
    ]
    assert vlm.generate_answers(prompts, sources, batch_size=4, progress=False) == one_by_one


def test_bitsandbytes_kernel_warning_is_muted_only_while_it_is_imported(caplog) -> None:
    import logging

    from vlm.lm import quiet_bitsandbytes_import

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        with quiet_bitsandbytes_import():
            log.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
            log.error("a real error still shows")
        log.warning("after the import: shown")
    assert [r.getMessage() for r in caplog.records] == ["a real error still shows", "after the import: shown"]
