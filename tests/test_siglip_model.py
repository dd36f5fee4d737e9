"""Parity of the from-scratch SigLIP text tower and dual encoder with transformers' `SiglipModel` (fp32, <= 1e-5),
loaded through our strict `load_siglip_model`; the padding guard; checkpoint errors; zero-shot and
retrieval helpers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import TINY, TINY_TEXT, randomize_, save
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel as HFSiglipModel

from vlm.siglip import SiglipVisionConfig
from vlm.siglip_model import SiglipConfig, SiglipModel, retrieval_recall
from vlm.siglip_text import SiglipTextConfig, SiglipTextEncoder
from vlm.weights import CheckpointError, load_siglip_model, save_siglip_model

EXACT = dict(atol=1e-5, rtol=0.0)
LENGTH = TINY_TEXT["max_position_embeddings"]  # 8
VOCAB = TINY_TEXT["vocab_size"]


def hf_dual(**text_overrides: Any) -> HFSiglipModel:
    """A tiny random transformers `SiglipModel`. The text head projects to the vision width (TINY's 32), as a
    dual encoder needs; `tests/hf_models.hf_siglip` keeps the text width (24) and serves vision-only tests."""
    text = {**TINY_TEXT, "projection_size": TINY["hidden_size"], **text_overrides}
    model = HFSiglipModel(HFSiglipConfig(text_config=text, vision_config=TINY))
    model.set_attn_implementation("eager")  # so the reference can return attention weights
    return randomize_(model).eval()


def padded_ids(lengths: list[int], pad: int = TINY_TEXT["pad_token_id"]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random texts of the given lengths padded to max length: (B, N) ids and the (B, N) attention mask."""
    ids = torch.randint(3, VOCAB, (len(lengths), LENGTH))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n:] = pad
        mask[row, :n] = 1
    return ids, mask


@pytest.fixture
def pair(tmp_path: Path) -> tuple[HFSiglipModel, SiglipModel]:
    hf = hf_dual(num_hidden_layers=2)
    return hf, load_siglip_model(save(hf, tmp_path))


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "attention-mask"])
def test_dual_encoder_matches_reference(pair, masked: bool) -> None:
    hf, ours = pair
    ids, mask = padded_ids([3, 8, 5])
    mask = mask if masked else None
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True)
        got = ours(ids, pixels, mask, return_loss=True)
    for name in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds", "loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **EXACT, msg=name)
    assert got.logits_per_image.shape == (3, 3) and got.loss.ndim == 0
    torch.testing.assert_close(got.image_embeds.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        # transformers 5 returns a BaseModelOutputWithPooling from these; the embedding is its pooler_output
        want_text = hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        want_image = hf.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(ours.get_text_features(ids, mask), want_text, **EXACT)
        torch.testing.assert_close(ours.get_image_features(pixels), want_image, **EXACT)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "attention-mask"])
def test_text_tower_matches_reference_layer_by_layer(masked: bool) -> None:
    hf = hf_dual(num_hidden_layers=3, num_attention_heads=4, intermediate_size=40)
    ours = SiglipTextEncoder(SiglipTextConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in hf.state_dict().items() if "text_model." in k}
    )
    ids, mask = padded_ids([1, 4, 8, 6])
    mask = mask if masked else None
    with torch.no_grad():
        want = hf.text_model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True
        )
        got = ours(ids, mask, output_hidden_states=True, output_attentions=True)
        fast = ours(ids, mask)  # without attention weights: the fused attention path when there is no mask
    for out in (got, fast):
        torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, **EXACT)
        torch.testing.assert_close(out.pooler_output, want.pooler_output, **EXACT)
    assert got.pooler_output.shape == (4, 32) and len(got.hidden_states) == len(want.hidden_states) == 4
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    if masked:  # padded keys get no attention at all, from any query
        assert all(
            float(w.masked_select(mask[:, None, None, :] == 0).abs().max()) == 0 for w in got.attentions
        )


def test_texts_must_be_padded_to_max_length(pair) -> None:
    hf, ours = pair
    ids, _ = padded_ids([3, 4])
    short = ids[:, :5]  # padded, but only to 5 of 8 positions
    with pytest.raises(ValueError, match=r"length 5 .* exactly 8: it pools the LAST position.*max_length"):
        ours.get_text_features(short)
    with pytest.raises(ValueError, match="exactly 8"):
        ours(short, torch.randn(2, 3, 32, 32))
    # Why: the reference accepts the short pad and pools position 4 instead of 7, a different embedding.
    with torch.no_grad():
        full = hf.get_text_features(input_ids=ids).pooler_output
        wrong = hf.get_text_features(input_ids=short).pooler_output
    assert (full - wrong).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"input_ids must be \(B, N\)"):
        ours.get_text_features(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        ours.get_text_features(ids, torch.ones(2, 5))


def test_forward_needs_both_sides(pair) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="needs both input_ids and pixel_values"):
        ours(input_ids=padded_ids([2])[0])


def test_zero_shot_is_the_sigmoid_of_the_reference_logits(pair) -> None:
    hf, ours = pair
    ids, _ = padded_ids([2, 5, 8])  # 3 labels for 2 images: a non-square table
    pixels = torch.randn(2, 3, 32, 32)
    probs = ours.zero_shot(pixels, ids)
    with torch.no_grad():
        want = torch.sigmoid(hf(input_ids=ids, pixel_values=pixels).logits_per_image)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs, want, **EXACT)


def test_save_siglip_model_round_trips_and_transformers_reads_it(pair, tmp_path: Path) -> None:
    _, ours = pair
    with torch.no_grad():  # leave the init values behind, so the round trip carries real ones
        ours.logit_scale.fill_(1.7)
        ours.logit_bias.fill_(-3.25)
    save_siglip_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "siglip" and config["architectures"] == ["SiglipModel"]
    again = load_siglip_model(tmp_path / "ours")
    assert again.config == ours.config
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    theirs = HFSiglipModel.from_pretrained(tmp_path / "ours").eval()
    ids, _ = padded_ids([4, 8])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = theirs(input_ids=ids, pixel_values=pixels, return_loss=True)
        got = again(ids, pixels, return_loss=True)
    torch.testing.assert_close(got.logits_per_image, want.logits_per_image, **EXACT)
    torch.testing.assert_close(got.loss, want.loss, **EXACT)
    assert not [p.name for p in (tmp_path / "ours").iterdir() if p.name.endswith(".tmp")]


def rewrite(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_missing_text_key_is_named(tmp_path: Path) -> None:
    save(hf_dual(), tmp_path)
    rewrite(tmp_path, lambda s: s.pop("text_model.final_layer_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): text_model.final_layer_norm.weight"):
        load_siglip_model(tmp_path)


def test_wrong_shape_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    save(hf_dual(), tmp_path)

    def edit(s: dict) -> None:
        s["text_model.head.weight"] = torch.zeros(16, 24)
        s["text_model.encoder.layers.5.mlp.fc1.bias"] = torch.zeros(48)

    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_siglip_model(tmp_path)
    message = str(err.value)
    assert "text_model.head.weight: checkpoint (16, 24) vs model (32, 24)" in message
    assert "unexpected (1): text_model.encoder.layers.5.mlp.fc1.bias" in message


def test_old_position_id_buffers_are_skipped_on_purpose(tmp_path: Path) -> None:
    hf = hf_dual()
    save(hf, tmp_path)
    rewrite(tmp_path, lambda s: s.update({"text_model.embeddings.position_ids": torch.arange(LENGTH)[None]}))
    ours = load_siglip_model(tmp_path)
    assert torch.equal(ours.logit_bias, hf.logit_bias)


def test_a_vision_only_checkpoint_is_refused(tmp_path: Path) -> None:
    save(hf_dual().vision_model, tmp_path)
    with pytest.raises(CheckpointError, match="'siglip_vision_model' checkpoint; a SigLIP dual encoder"):
        load_siglip_model(tmp_path)


def test_base_shapes_and_keys_equal_the_reference() -> None:
    """The real google/siglip-base-patch16-224 shape, built on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        theirs = HFSiglipModel(HFSiglipConfig())
        ours = SiglipModel(SiglipConfig())
    shapes = lambda model: {key: tuple(t.shape) for key, t in model.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert ours.config.text_config == SiglipTextConfig.from_dict(HFSiglipConfig().to_dict())
    assert ours.config.vision_config == SiglipVisionConfig.from_dict(HFSiglipConfig().to_dict())


def test_init_and_gradients_reach_every_parameter() -> None:
    config = SiglipConfig(
        SiglipTextConfig(**{**TINY_TEXT, "projection_size": 32}), SiglipVisionConfig(**TINY)
    )
    model = SiglipModel(config)
    assert model.logit_scale.shape == model.logit_bias.shape == (1,)
    assert (
        math.isclose(model.logit_scale.item(), math.log(10), rel_tol=1e-6) and model.logit_bias.item() == -10
    )
    ids, _ = padded_ids([3, 6, 8, 2])
    model(ids, torch.randn(4, 3, 32, 32), return_loss=True).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="projection_size 24 must equal the vision hidden_size 32"):
        SiglipConfig(SiglipTextConfig(**TINY_TEXT), SiglipVisionConfig(**TINY))
    with pytest.raises(ValueError, match="vision_use_head"):
        SiglipConfig(vision_config=SiglipVisionConfig(vision_use_head=False))
    with pytest.raises(ValueError, match="divisible"):
        SiglipTextConfig(hidden_size=30, num_attention_heads=4)
    text = SiglipTextConfig(hidden_size=48, num_attention_heads=4)
    assert (
        text.projection_size == 48 and text.head_dim == 12
    )  # None resolves to hidden_size, as in the reference
    with pytest.raises(AttributeError):
        text.hidden_size = 64  # type: ignore[misc]


def test_retrieval_recall_counts_ranks_by_hand() -> None:
    # Image i is the unit vector e_i. Text 0 matches image 0 best; text 1 sits nearer image 2 than image 1;
    # text 2 sits nearer image 0 than image 2.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.5, 0.9], [0.8, 0.0, 0.6]])
    # scores[i, j] = cos(image i, text j); per image (row): image 0 ranks texts 0, 2, 1 -> match first;
    # image 1 ranks 1 first (0.49 vs 0.1, 0) -> first; image 2 ranks 1 (0.87) above 2 (0.6) -> second.
    # Per text (column): text 0 -> image 0 first; text 1 -> image 2 above image 1 -> second;
    # text 2 -> image 0 (0.8) above image 2 (0.6) -> second.
    recall = retrieval_recall(images, texts, ks=(1, 2))
    assert recall == pytest.approx(
        {"image_to_text@1": 2 / 3, "image_to_text@2": 1.0, "text_to_image@1": 1 / 3, "text_to_image@2": 1.0}
    )
    collapsed = retrieval_recall(torch.ones(4, 8), torch.ones(4, 8), ks=(1, 4))  # ties count against
    assert collapsed == {
        "image_to_text@1": 0.0,
        "text_to_image@1": 0.0,
        "image_to_text@4": 1.0,
        "text_to_image@4": 1.0,
    }
    with pytest.raises(ValueError, match="one shape"):
        retrieval_recall(torch.ones(4, 8), torch.ones(3, 8))
