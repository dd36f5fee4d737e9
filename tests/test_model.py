"""The assembled VLM on a tiny random Llama LM and a tiny random SigLIP tower (SmolLM2's real tokenizer)."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlm.conversation import IGNORE_INDEX, user
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.projector import ProjectorConfig
from vlm.siglip import SiglipVisionConfig
from vlm.weights import CheckpointError

VISION = SiglipVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def tiny_lm(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    lm = LlamaForCausalLM(config).eval()
    # Large random weights: with HF's small init every prompt greedily decodes to the same token, and the
    # cache/batching/streaming comparisons below could not fail. These decode to varied, input-dependent text.
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.3)
    return lm


@pytest.fixture(scope="module")
def parts(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    return tiny_lm(tokenizer), tokenizer


def build(parts, **overrides) -> VisionLanguageModel:
    lm, tokenizer = parts
    projector = ProjectorConfig(VISION.hidden_size, lm.config.hidden_size, **overrides.pop("projector", {}))
    config = VLMConfig(vision=VISION, projector=projector, lm_source="unused-in-tests", **overrides)
    torch.manual_seed(2)
    return VisionLanguageModel.build(config, lm=(copy.deepcopy(lm), copy.deepcopy(tokenizer)))


def images(n: int) -> list[Image.Image]:
    colours = [(255, 0, 0), (0, 128, 255), (20, 200, 20), (250, 250, 0)]
    return [Image.new("RGB", (40 + 8 * i, 30), colours[i % 4]) for i in range(n)]


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


def test_save_and_load_round_trip_gives_identical_logits(parts, tmp_path) -> None:
    vlm = build(parts, projector={"kind": "mlp"}, vision_feature_layer=-2)
    vlm.save_pretrained(tmp_path)
    again = VisionLanguageModel.from_pretrained(
        tmp_path, lm=(copy.deepcopy(parts[0]), copy.deepcopy(parts[1]))
    )
    assert again.config == vlm.config
    batch = vlm.prepare([[user("What is it?", images(1)), {"role": "assistant", "content": "A square."}]])
    with torch.no_grad():
        a = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels)
        b = again(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.labels)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert a.loss == b.loss


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
