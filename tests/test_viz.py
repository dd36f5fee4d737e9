"""The visualisations: PNGs that open, and maps that follow the model's weights, on a tiny random tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
from vlm.viz import (
    attention_map,
    plot_attention,
    plot_patch_filters,
    plot_position_similarity,
    position_similarity,
    write_visualisations,
)

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
GRID = 4  # 32 / 8


def tiny(**overrides) -> SiglipVisionEncoder:
    return SiglipVisionEncoder(SiglipVisionConfig(**{**TINY, **overrides})).eval()


def picture(width: int = 48, height: int = 32) -> Image.Image:
    """A red square on a blue background, so the overlay has something to show."""
    image = Image.new("RGB", (width, height), (20, 40, 200))
    image.paste((220, 30, 30), (width // 4, height // 4, width // 2, height // 2))
    return image


def assert_png(path: Path, min_side: int = 100) -> tuple[int, int]:
    assert path.is_file() and path.suffix == ".png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert min(png.size) >= min_side, png.size
        assert max(png.size) <= 4000, png.size  # sensible dpi: not a poster
        return png.size


def plain_residual_(encoder: SiglipVisionEncoder) -> SiglipVisionEncoder:
    """Make every encoder layer the identity (attention and MLP outputs zero), the patch conv bias zero
    and the position embeddings zero, so each token entering the head is LayerNorm(position embedding)
    for a zero (grey) image, and whatever is planted in a position embedding reaches the attention."""
    with torch.no_grad():
        for layer in encoder.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        encoder.embeddings.patch_embedding.bias.zero_()
        encoder.embeddings.position_embedding.weight.zero_()
    return encoder


def plant(encoder: SiglipVisionEncoder, row: int, col: int) -> torch.Tensor:
    """Give patch (row, col) a distinctive position embedding; return the unit direction planted."""
    direction = torch.zeros(TINY["hidden_size"])
    direction[0], direction[1] = 1.0, -1.0  # zero mean, so LayerNorm keeps its direction; both in head 0
    with torch.no_grad():
        encoder.embeddings.position_embedding.weight[row * GRID + col] = 10 * direction
    return direction


def test_position_similarity_is_the_cosine_matrix() -> None:
    encoder = tiny()
    with torch.no_grad():
        pos = encoder.embeddings.position_embedding.weight
        pos[5] = 3 * pos[2]  # same direction, other length
        pos[7] = -pos[2]
    sim = position_similarity(encoder)
    assert sim.shape == (GRID * GRID, GRID * GRID) and sim.dtype == torch.float32
    torch.testing.assert_close(sim.diagonal(), torch.ones(GRID * GRID))
    torch.testing.assert_close(sim, sim.T)
    assert sim[2, 5].item() == pytest.approx(1.0, abs=1e-5)
    assert sim[2, 7].item() == pytest.approx(-1.0, abs=1e-5)
    # Random 32-d vectors are far from parallel: off the planted pairs nothing is close to 1.
    off = sim - torch.eye(GRID * GRID)
    off[2, 5] = off[5, 2] = off[2, 7] = off[7, 2] = off[5, 7] = off[7, 5] = 0
    assert off.abs().max() < 0.9


def test_attention_map_follows_the_head_probe() -> None:
    encoder = plain_residual_(tiny())
    direction = plant(encoder, row=2, col=1)
    head = encoder.head
    with torch.no_grad():
        # Keys are the tokens themselves and the probe's query is the planted direction: only patch
        # (2, 1) has a key along it, so the probe must attend there.
        d = TINY["hidden_size"]
        wq, wk, _ = head.attention.in_proj_weight.chunk(3)
        wq.copy_(torch.eye(d))
        wk.copy_(torch.eye(d))
        head.attention.in_proj_bias.zero_()
        head.probe.copy_(5 * direction)
    heat = attention_map(encoder, torch.zeros(1, 3, 32, 32))
    assert heat.shape == (GRID, GRID) and heat.dtype == torch.float32
    assert heat.min().item() == 0.0 and heat.max().item() == 1.0
    assert divmod(heat.argmax().item(), GRID) == (2, 1)
    # Moving the planted embedding moves the map: it is read from the model, not from the picture.
    plant(encoder, row=0, col=3)
    with torch.no_grad():
        encoder.embeddings.position_embedding.weight[2 * GRID + 1] = 0
    assert divmod(attention_map(encoder, torch.zeros(3, 32, 32)).argmax().item(), GRID) == (0, 3)


def test_attention_map_without_head_reads_the_last_layer() -> None:
    encoder = plain_residual_(tiny(vision_use_head=False))
    direction = plant(encoder, row=3, col=2)
    attn = encoder.encoder.layers[-1].self_attn
    with torch.no_grad():
        # Every query is the same planted direction (weight 0, bias only) and keys are the tokens:
        # all queries attend to patch (3, 2), so does their mean.
        attn.q_proj.weight.zero_()
        attn.q_proj.bias.copy_(5 * direction)
        attn.k_proj.weight.copy_(torch.eye(TINY["hidden_size"]))
        attn.k_proj.bias.zero_()
    heat = attention_map(encoder, torch.zeros(1, 3, 32, 32))
    assert heat.shape == (GRID, GRID)
    assert divmod(heat.argmax().item(), GRID) == (3, 2)
    assert heat.min().item() >= 0.0 and heat.max().item() == 1.0


@pytest.mark.parametrize("use_head", [True, False])
def test_attention_map_non_square_grid(use_head: bool) -> None:
    encoder = tiny(vision_use_head=use_head)
    heat = attention_map(encoder, torch.randn(1, 3, 24, 48), interpolate_pos_encoding=True)
    assert heat.shape == (3, 6)
    assert heat.min().item() >= 0.0 and heat.max().item() <= 1.0
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        attention_map(encoder, torch.randn(1, 3, 24, 48))


def test_attention_map_takes_one_image() -> None:
    with pytest.raises(ValueError, match="one image"):
        attention_map(tiny(), torch.zeros(2, 3, 32, 32))


def test_attention_map_bf16_and_training_mode_restored() -> None:
    encoder = tiny().to(torch.bfloat16).train()
    heat = attention_map(encoder, torch.randn(1, 3, 32, 32))
    assert heat.dtype == torch.float32 and heat.shape == (GRID, GRID)
    assert torch.isfinite(heat).all() and heat.max().item() == 1.0
    assert encoder.training


def test_plots_write_pngs(tmp_path: Path) -> None:
    encoder = tiny().to(torch.bfloat16)  # plotting casts to float32
    assert_png(plot_patch_filters(encoder, tmp_path / "f.png", max_filters=10))
    assert_png(plot_position_similarity(encoder, tmp_path / "nested" / "p.png"))
    width, height = assert_png(
        plot_attention(encoder, picture(), tmp_path / "a.png", interpolate_pos_encoding=True)
    )
    assert width > height  # two panels side by side


def test_position_plot_subsamples_large_grids(tmp_path: Path) -> None:
    encoder = tiny(hidden_size=8, num_attention_heads=2, image_size=40, patch_size=2)  # 20 x 20 grid
    width, height = assert_png(plot_position_similarity(encoder, tmp_path / "p.png"))
    assert width < 2000 and height < 2000


def test_write_visualisations(tmp_path: Path) -> None:
    encoder = tiny()
    paths = write_visualisations(encoder, tmp_path / "out", prefix="random")
    assert [p.name for p in paths] == ["random_patch_filters.png", "random_position_similarity.png"]
    for path in paths:
        assert_png(path)
    assert [p.name for p in write_visualisations(encoder, tmp_path)] == [
        "patch_filters.png",
        "position_similarity.png",
    ]


def test_write_visualisations_with_image(tmp_path: Path) -> None:
    image_path = tmp_path / "in.png"
    picture(64, 64).save(image_path)
    paths = write_visualisations(tiny(), tmp_path, image=image_path, prefix="trained_")
    assert [p.name for p in paths] == [
        "trained_patch_filters.png",
        "trained_position_similarity.png",
        "trained_attention.png",
    ]
    for path in paths:
        assert_png(path)
