"""Projector shapes and token counts, and pixel shuffle's exact rearrangement."""

from __future__ import annotations

import pytest
import torch

from vlm.projector import Projector, ProjectorConfig, pixel_shuffle


@pytest.mark.parametrize(("kind", "tokens", "names"), [
    ("linear", 64, {"linear_1.weight", "linear_1.bias"}),
    ("mlp", 64, {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}),
    ("pixel_shuffle", 16, {"linear_1.weight", "linear_1.bias"}),
])  # fmt: skip
def test_shapes_and_token_counts(kind: str, tokens: int, names: set[str]) -> None:
    config = ProjectorConfig(vision_hidden_size=24, text_hidden_size=40, kind=kind)
    projector = Projector(config)
    assert set(projector.state_dict()) == names
    out = projector(torch.randn(3, 64, 24), (8, 8))
    assert out.shape == (3, tokens, 40) and config.num_tokens((8, 8)) == tokens


def test_pixel_shuffle_folds_each_block_into_one_token() -> None:
    rows, cols, dim = 4, 6, 3
    x = torch.arange(rows * cols * dim, dtype=torch.float32).view(1, rows * cols, dim)
    out = pixel_shuffle(x, (rows, cols), 2)
    assert out.shape == (1, 6, 12)
    grid = x.view(rows, cols, dim)
    # token (1, 2) of the 2x3 output holds patches (2,4), (2,5), (3,4), (3,5), in that order
    want = torch.cat([grid[2, 4], grid[2, 5], grid[3, 4], grid[3, 5]])
    torch.testing.assert_close(out[0, 1 * 3 + 2], want)


def test_pixel_shuffle_needs_a_divisible_grid() -> None:
    config = ProjectorConfig(vision_hidden_size=8, text_hidden_size=8, kind="pixel_shuffle", scale_factor=3)
    with pytest.raises(ValueError, match="divisible by 3, got 8x8"):
        config.num_tokens((8, 8))
    with pytest.raises(ValueError, match="divisible by 3"):
        Projector(config)(torch.randn(1, 64, 8))


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="linear, mlp or pixel_shuffle"):
        ProjectorConfig(8, 8, kind="qformer")


@pytest.mark.parametrize("kind", ["linear", "pixel_shuffle"])
def test_pooled_token_comes_first_from_its_own_map(kind: str) -> None:
    config = ProjectorConfig(vision_hidden_size=24, text_hidden_size=40, kind=kind, pooled_token=True)
    projector = Projector(config)
    assert {"pooled.weight", "pooled.bias"} <= set(projector.state_dict())
    x, pooled = torch.randn(3, 64, 24), torch.randn(3, 24)
    out = projector(x, (8, 8), pooled)
    grid_tokens = 16 if kind == "pixel_shuffle" else 64
    assert out.shape == (3, 1 + grid_tokens, 40) and config.num_tokens((8, 8)) == 1 + grid_tokens
    torch.testing.assert_close(out[:, 0], projector.pooled(pooled))
    without = Projector(ProjectorConfig(24, 40, kind=kind))
    without.load_state_dict({k: v for k, v in projector.state_dict().items() if not k.startswith("pooled.")})
    torch.testing.assert_close(out[:, 1:], without(x, (8, 8)))  # the grid tokens are untouched
    with pytest.raises(ValueError, match="pooled embedding"):
        projector(x, (8, 8))
