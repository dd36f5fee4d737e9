"""The assembled VLM on a tiny random Llama LM and a tiny random SigLIP tower (SmolLM2's real tokenizer)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
from tiny import VISION, build, images, save_vlm, tiny_lm  # noqa: F401  (tiny_lm: other tests import it from here)

from vlm.cli import main
from vlm.conversation import IGNORE_INDEX, user
from vlm.lora import LoraSettings, add_lora
from vlm.model import DEFAULT_MODEL_DIR, Chat, ContextTooLong, VisionLanguageModel, VLMConfig
from vlm.weights import CheckpointError


def test_without_images_the_vlm_is_the_bare_lm(parts) -> None:
    vlm = build(parts)
    bare = parts[0]
    batch = vlm.prepare([[user("What is the capital of France?")]], for_generation=True)
    with torch.no_grad():
        ours = vlm(batch.input_ids, batch.attention_mask).logits
        theirs = bare(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-5, rtol=0)


def test_image_tokens_land_exactly_at_the_placeholders(parts) -> None:
    vlm = build(parts)
    conversation = [user("Compare these.", images(2))]
    batch = vlm.prepare([conversation], for_generation=True)
    is_image = batch.input_ids[0] == vlm.image_token_id
    assert int(is_image.sum()) == 2 * vlm.tokens_per_image == 32
    with torch.no_grad():
        embeds = vlm.embed(batch.input_ids, batch.pixel_values)[0]
        text = vlm.lm.get_input_embeddings()(batch.input_ids)[0]
        projected = vlm.encode_images(batch.pixel_values).reshape(-1, embeds.shape[-1])
    torch.testing.assert_close(embeds[is_image], projected, atol=0, rtol=0)
    torch.testing.assert_close(embeds[~is_image], text[~is_image], atol=0, rtol=0)
    # each image's tokens are one contiguous run, image 0 first
    positions = is_image.nonzero().flatten()
    assert (positions[1:16] - positions[:15] == 1).all() and (positions[17:] - positions[16:-1] == 1).all()


def test_labels_teach_only_the_assistant(parts) -> None:
    vlm = build(parts)
    tokenizer = vlm.tokenizer
    conversation = [
        user("What shape is it?", images(1)),
        {"role": "assistant", "content": "A circle."},
        user("And its colour?"),
        {"role": "assistant", "content": "Red."},
    ]
    batch = vlm.prepare([conversation, [user("Hi"), {"role": "assistant", "content": "Hello!"}]])
    learned = batch.labels[0] != IGNORE_INDEX
    assert tokenizer.decode(batch.input_ids[0][learned]) == "A circle.<|im_end|>\nRed.<|im_end|>\n"
    assert not learned[batch.input_ids[0] == vlm.image_token_id].any()
    assert (batch.labels[1][batch.attention_mask[1] == 0] == IGNORE_INDEX).all()  # right padding ignored
    out = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n.split(".")[0] for n, p in vlm.named_parameters() if p.grad is not None}
    assert trainable == {"projector"}  # the default config freezes the vision tower and the LM


@pytest.mark.parametrize("kind", ["linear", "mlp", "pixel_shuffle"])
def test_greedy_is_identical_with_and_without_kv_cache(parts, kind) -> None:
    vlm = build(parts, projector={"kind": kind})
    conversation = [user("Describe the picture.", images(1))]
    cached = vlm.generate([conversation], max_new_tokens=10, use_cache=True)
    uncached = vlm.generate([conversation], max_new_tokens=10, use_cache=False)
    assert cached == uncached and cached[0]


def test_batched_generation_equals_one_by_one(parts) -> None:
    vlm = build(parts)
    conversations = [
        [user("What colour is this?", images(1))],
        [user("A much longer question about two pictures, to force left padding here?", images(2))],
        [user("No image at all.")],
    ]
    batched = vlm.generate(conversations, max_new_tokens=8)
    single = [vlm.generate([c], max_new_tokens=8)[0] for c in conversations]
    assert batched == single
    assert len(set(batched)) == 3 and all(len(set(text.split())) >= 3 for text in batched)


def test_the_answer_depends_on_the_image(parts) -> None:
    vlm = build(parts)
    red, blue = images(2)
    assert vlm.ask(red, "What colour is this?", max_new_tokens=8) != vlm.ask(
        blue, "What colour is this?", max_new_tokens=8
    )


def test_streaming_yields_the_same_text(parts) -> None:
    vlm = build(parts)
    pieces = list(vlm.stream(images(1)[0], "What is this?", max_new_tokens=12))
    assert len(pieces) >= 1
    assert len(pieces) >= 3  # it really streamed, piece by piece
    assert "".join(pieces) == vlm.ask(images(1)[0], "What is this?", max_new_tokens=12)


def test_sampling_is_seeded_and_varies(parts) -> None:
    vlm = build(parts)
    torch.manual_seed(0)
    a = vlm.ask(None, "Tell me a story.", max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50)
    torch.manual_seed(0)
    b = vlm.ask(None, "Tell me a story.", max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50)
    assert a == b
    assert a != vlm.ask(None, "Tell me a story.", max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=50)


@pytest.mark.parametrize("projector", [{"kind": "mlp"}, {"kind": "pixel_shuffle", "pooled_token": True}])
def test_save_and_load_round_trip_gives_identical_logits(parts, tmp_path, projector) -> None:
    vlm = build(parts, projector=projector, vision_feature_layer=-2)
    vlm.save_pretrained(tmp_path)
    again = VisionLanguageModel.from_pretrained(
        tmp_path, lm=(copy.deepcopy(parts[0]), copy.deepcopy(parts[1]))
    )
    assert again.config == vlm.config
    batch = vlm.prepare([[user("What is it?", images(1)), {"role": "assistant", "content": "A square."}]])
    with torch.no_grad():
        a = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values)
        b = again(batch.input_ids, batch.attention_mask, batch.pixel_values)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_loss_equals_the_lm_own_loss_over_all_logits(parts) -> None:
    vlm = build(parts)
    batch = vlm.prepare(
        [
            [user("What is it?", images(1)), {"role": "assistant", "content": "A red square, I think."}],
            [user("And this one?", images(1)), {"role": "assistant", "content": "Blue."}],
        ]
    )
    with torch.no_grad():
        ours = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels)
        summed = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels, reduction="sum")
        embeds = vlm.embed(batch.input_ids, batch.pixel_values)
        reference = vlm.lm(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels)
    torch.testing.assert_close(ours.loss, reference.loss, atol=1e-5, rtol=1e-5)
    n_learned = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
    assert ours.logits.shape == (n_learned, vlm.lm.config.vocab_size)
    torch.testing.assert_close(summed.loss, ours.loss * n_learned, atol=1e-4, rtol=1e-5)


def test_system_prompt_goes_before_conversations_without_one(parts) -> None:
    vlm = build(parts, system_prompt="Answer in one word.")
    text = vlm.tokenizer.decode(vlm.prepare([[user("Hi")]], for_generation=True).input_ids[0])
    assert text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>") and "SmolLM" not in text
    own = [{"role": "system", "content": "Be verbose."}, user("Hi")]
    assert "Be verbose." in vlm.tokenizer.decode(vlm.prepare([own], for_generation=True).input_ids[0])


def test_wrong_folders_fail_clearly(parts, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no model folder"):
        VisionLanguageModel.from_pretrained(tmp_path / "missing")
    vlm = build(parts)
    vlm.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a vlm model folder"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_bad_prompts_are_clear_errors(parts) -> None:
    vlm = build(parts)
    with pytest.raises(ValueError, match="empty"):
        vlm.ask(None, "   ")
    with pytest.raises(ValueError, match="image tokens but no image"):
        ids = torch.tensor([[1, vlm.image_token_id, 2]])
        vlm.embed(ids, None)
    with pytest.raises(ValueError, match="images belong in user turns"):
        vlm.prepare([[{"role": "assistant", "content": [{"type": "image", "image": images(1)[0]}]}]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        vlm.ask(None, "hi", max_new_tokens=0)


def test_the_pooled_token_is_the_tower_pooled_embedding_spliced_first(parts) -> None:
    vlm = build(parts, projector={"kind": "pixel_shuffle", "pooled_token": True})
    rows, cols = vlm.config.grid
    assert vlm.tokens_per_image == 1 + (rows // 2) * (cols // 2)
    batch = vlm.prepare([[user("What is it?", images(1))]], for_generation=True)
    assert int((batch.input_ids == vlm.image_token_id).sum()) == vlm.tokens_per_image
    with torch.no_grad():
        tokens = vlm.encode_images(batch.pixel_values)
        pooled = vlm.vision(batch.pixel_values).pooler_output
    torch.testing.assert_close(tokens[:, 0], vlm.projector.pooled(pooled))
    assert isinstance(vlm.generate([[user("What is it?", images(1))]], max_new_tokens=3)[0], str)
    headless = VLMConfig(
        vision=replace(VISION, vision_use_head=False), projector=vlm.config.projector, lm_source="unused"
    )
    with pytest.raises(ValueError, match="pooling head"):
        VisionLanguageModel.build(headless, lm=(copy.deepcopy(parts[0]), copy.deepcopy(parts[1])))


# -- a fine-tuned model's folder records its adapter --------------------------------------------------------------


def tuned_folder(parts, lm_folder, folder):
    """A tiny model with a LoRA adapter saved as fine-tuning saves one: config.json, then adapter/."""
    model = build(parts)
    settings = LoraSettings(r=2, alpha=4, dropout=0.0)
    add_lora(model, settings)
    return save_vlm(model, folder, lm_folder, settings)


def test_a_model_folder_that_lost_its_adapter_is_refused_before_the_lm_loads(
    parts, tiny_lm_folder, tmp_path, monkeypatch
) -> None:
    folder = tuned_folder(parts, tiny_lm_folder, tmp_path / "tuned")
    assert json.loads((folder / "config.json").read_text())["adapter"] is True
    assert VisionLanguageModel.from_pretrained(folder).has_adapter
    shutil.rmtree(folder / "adapter")  # copied without it: the base weights alone would answer

    def no_lm(*args: object, **kwargs: object) -> None:
        raise AssertionError("the LM loaded before the folder was checked")

    monkeypatch.setattr("vlm.model.load_lm", no_lm)
    with pytest.raises(CheckpointError, match=r"tuned has no adapter/ folder, but its config.json records"):
        VisionLanguageModel.from_pretrained(folder)


def test_folders_without_an_adapter_load_and_old_folders_load_as_before(
    parts, tiny_lm_folder, tmp_path
) -> None:
    plain = save_vlm(build(parts), tmp_path / "plain", tiny_lm_folder)
    assert json.loads((plain / "config.json").read_text())["adapter"] is False
    assert not VisionLanguageModel.from_pretrained(plain).has_adapter
    # Saved before the record existed: adapter/ decides, as it always has.
    tuned = tuned_folder(parts, tiny_lm_folder, tmp_path / "old")
    config = json.loads((tuned / "config.json").read_text())
    del config["adapter"]
    (tuned / "config.json").write_text(json.dumps(config))
    assert VisionLanguageModel.from_pretrained(tuned).has_adapter
    config["adapter"] = "yes"
    (tuned / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="old/config.json: adapter must be true or false, got 'yes'"):
        VisionLanguageModel.from_pretrained(tuned)


def test_a_merged_model_records_that_it_has_no_adapter(parts, tiny_lm_folder, tmp_path) -> None:
    tuned = tuned_folder(parts, tiny_lm_folder, tmp_path / "tuned")
    assert main(["merge", str(tuned), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["adapter"] is False
    assert not VisionLanguageModel.from_pretrained(tmp_path / "merged").has_adapter
    # the adapter copied in beside the merged weights would be applied a second time
    shutil.copytree(tuned / "adapter", tmp_path / "merged" / "adapter")
    with pytest.raises(
        CheckpointError, match="merged has an adapter/ folder, but its config.json records none"
    ):
        VisionLanguageModel.from_pretrained(tmp_path / "merged")


def test_the_shipped_model_records_the_adapter_it_ships_with() -> None:
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["adapter"] is True
    assert (DEFAULT_MODEL_DIR / "adapter" / "adapter_model.safetensors").is_file()


# -- max_new_tokens that leaves no room for any message ------------------------------------------------------------


def test_max_new_tokens_beyond_the_context_is_named_as_the_problem(parts) -> None:
    vlm = build(parts)  # the tiny LM reads 512 tokens
    with pytest.raises(
        ContextTooLong,
        match=r"^max new tokens \(100,000\) is larger than this model's whole context \(512 tokens",
    ):
        vlm.ask(None, "hi", max_new_tokens=100_000)
    with pytest.raises(
        ContextTooLong, match=r"^max new tokens \(512\) is as large as this model's whole context"
    ):
        next(Chat(vlm).send("hi", max_new_tokens=512))
    # Room for an answer but not for this message: the message is named, as before.
    with pytest.raises(
        ContextTooLong, match=r"^the message is \d+ tokens, more than the 2 this model can read"
    ):
        vlm.ask(None, "hi", max_new_tokens=510)
