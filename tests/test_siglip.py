"""Parity of the from-scratch SigLIP vision tower with transformers' `SiglipVisionModel` (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from hf_models import hf_siglip, hf_vision, randomize_, save
from transformers import SiglipVisionConfig as HFVisionConfig
from transformers import SiglipVisionModel

import vlm.siglip
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder, kernel_choice, pin_kernel
from vlm.weights import load_vision_encoder

EXACT = dict(atol=1e-5, rtol=0.0)

CONFIGS = {
    "tiny-head": {},
    "no-head": dict(vision_use_head=False, patch_size=4, image_size=16, num_attention_heads=2),
    "wide-3-heads": dict(
        hidden_size=48, intermediate_size=80, num_attention_heads=3, image_size=48, patch_size=16
    ),
    "deep-p14": dict(num_hidden_layers=4, image_size=28, patch_size=14, hidden_act="gelu_pytorch_tanh"),
}


def assert_same_outputs(ours: SiglipVisionEncoder, hf: SiglipVisionModel, pixels: torch.Tensor, **kw) -> None:
    with torch.no_grad():
        want = hf(pixel_values=pixels, output_hidden_states=True, output_attentions=True, **kw)
        got = ours(pixels, output_hidden_states=True, output_attentions=True, **kw)
        fast = ours(pixels, **kw)  # the default path: fused scaled_dot_product_attention
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **EXACT)
    torch.testing.assert_close(fast.last_hidden_state, want.last_hidden_state, **EXACT)
    if hf.config.vision_use_head:
        torch.testing.assert_close(got.pooler_output, want.pooler_output, **EXACT)
        torch.testing.assert_close(fast.pooler_output, want.pooler_output, **EXACT)
    else:
        assert got.pooler_output is None and fast.pooler_output is None
    assert len(got.hidden_states) == len(want.hidden_states) == hf.config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, **EXACT)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.fixture(params=["measured", "onednn", "aten"])
def kernel(request, monkeypatch) -> str:
    """Each CPU linear kernel the tower may pick (`vlm.siglip.kernel_choice`): the one measured here, and
    each forced, so that parity holds whichever a machine measures as faster."""
    monkeypatch.setattr(vlm.siglip, "_CHOICES", {})
    if request.param != "measured":
        pin_kernel(torch.float32, request.param)
    return request.param


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_reference_loaded_through_load_vision_encoder(name: str, kernel: str, tmp_path) -> None:
    hf = hf_vision(**CONFIGS[name])
    ours = load_vision_encoder(save(hf, tmp_path))
    size = hf.config.image_size
    assert_same_outputs(ours, hf, torch.randn(3, 3, size, size))


def test_vision_tower_of_a_full_siglip_checkpoint(tmp_path) -> None:
    hf = hf_siglip()
    ours = load_vision_encoder(save(hf, tmp_path))
    assert_same_outputs(ours, hf.vision_model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(("height", "width"), [(48, 64), (64, 40), (16, 16)])
def test_interpolated_position_embeddings_match_reference(height: int, width: int) -> None:
    hf = hf_vision()
    ours = SiglipVisionEncoder(SiglipVisionConfig.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict())
    assert_same_outputs(ours, hf, torch.randn(2, 3, height, width), interpolate_pos_encoding=True)


def test_480x640_with_patch_16_gives_1200_tokens() -> None:
    hf = hf_vision(image_size=224, patch_size=16, num_hidden_layers=1)
    ours = SiglipVisionEncoder(SiglipVisionConfig.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict())
    pixels = torch.randn(1, 3, 480, 640)
    out = ours(pixels, interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 1200, 32)
    assert_same_outputs(ours, hf, pixels, interpolate_pos_encoding=True)


def test_other_size_without_interpolation_is_a_clear_error() -> None:
    ours = SiglipVisionEncoder(SiglipVisionConfig(**{**_tiny(), "image_size": 32, "patch_size": 8}))
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        ours(torch.randn(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, H, W\)"):
        ours(torch.randn(3, 32, 32))


def test_base_shape_keys_and_outputs_match_reference() -> None:
    """Once at the real google/siglip-base-patch16-224 shape (random weights: none can be downloaded)."""
    hf_config = HFVisionConfig()  # transformers' defaults are the base model's shape
    hf_config._attn_implementation = "sdpa"
    hf = randomize_(SiglipVisionModel(hf_config)).eval()
    for p in hf.parameters():  # random but tame: base-depth activations must stay finite in fp32
        p.data.mul_(0.1)
    config = SiglipVisionConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (
        768,
        12,
        224,
        16,
    )
    ours = SiglipVisionEncoder(config).eval()
    shapes = lambda model: {key: tuple(t.shape) for key, t in model.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(hf)  # the same keys, one for one, with the same shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    ours.load_state_dict(hf.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got = hf(pixel_values=pixels), ours(pixels)
    assert got.last_hidden_state.shape == (2, 196, 768) and got.pooler_output.shape == (2, 768)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **EXACT)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, **EXACT)


def test_the_kernel_is_chosen_once_by_measuring_or_as_pinned(monkeypatch) -> None:
    monkeypatch.setattr(vlm.siglip, "_CHOICES", {})
    first = kernel_choice(torch.float32)
    assert first in ("onednn", "aten") and {torch.float32: first} == vlm.siglip._CHOICES  # measured, kept
    monkeypatch.setattr(vlm.siglip, "_measure", lambda dtype: pytest.fail("measured twice"))
    assert kernel_choice(torch.float32) == first
    pin_kernel(torch.float32, "aten")
    assert kernel_choice(torch.float32) == "aten"
    assert kernel_choice(torch.float16) == "aten"  # oneDNN's fused linear is not used for float16
    with pytest.raises(ValueError, match="does not run torch.float16"):
        pin_kernel(torch.float16, "onednn")


def test_bf16_stays_close_to_fp32() -> None:
    hf = hf_vision(num_hidden_layers=4)
    ours = SiglipVisionEncoder(SiglipVisionConfig.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict())
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = ours(pixels).pooler_output
        half = ours.to(torch.bfloat16)(pixels).pooler_output
    assert half.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.float(), full).min() > 0.999


def test_gradients_flow_to_every_parameter() -> None:
    ours = SiglipVisionEncoder(SiglipVisionConfig(**_tiny()))
    out = ours(torch.randn(2, 3, 32, 32))
    (out.last_hidden_state.square().mean() + out.pooler_output.square().mean()).backward()
    assert [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []


def test_config_is_frozen_and_validated() -> None:
    config = SiglipVisionConfig(**_tiny())
    with pytest.raises(AttributeError):
        config.hidden_size = 64  # type: ignore[misc]
    assert (config.head_dim, config.num_patches) == (8, 16)
    with pytest.raises(ValueError, match="divisible"):
        SiglipVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipVisionConfig(hidden_act="swish")


def _tiny() -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
