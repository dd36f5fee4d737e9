"""Projectors: vision patch embeddings (B, N, D_vision) -> LM input embeddings (B, T, D_lm).

References
- LLaVA (Liu et al., 2023): `linear`, one matrix; LLaVA-1.5: `mlp`, Linear-GELU-Linear.
- Idefics3 / SmolVLM / nanoVLM: `pixel_shuffle`, a space-to-depth rearrangement that folds each f x f block
  of patches into one token (f^2 fewer image tokens, f^2 wider), then a linear map.

`pooled_token` (any kind) puts one more token first: the tower's pooled embedding (SigLIP's attention-pooling
head, the vector its contrastive training shaped) through its own linear map. It hands the LM the whole-image
summary the dual encoder learned, which patch tokens only hold spread out: a tower that reads easy-VQA's
shapes zero-shot at 98% left a VLM reading only its patch tokens at ~70% on shape questions after 1,000 steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlm.checks import config_from_dict, positive_int

ProjectorKind = Literal["linear", "mlp", "pixel_shuffle"]


@dataclass(frozen=True)
class ProjectorConfig:
    vision_hidden_size: int
    text_hidden_size: int
    kind: ProjectorKind = "linear"
    scale_factor: int = 2  # pixel_shuffle only: f, the side of the block of patches merged into one token
    pooled_token: bool = False  # one more token, first: the tower's pooled (MAP head) embedding
    bias: bool = True  # the projection's Linear layers have biases (Idefics3's connector has none)

    def __post_init__(self) -> None:
        positive_int(self.vision_hidden_size, "vision_hidden_size")
        positive_int(self.text_hidden_size, "text_hidden_size")
        if self.kind not in ("linear", "mlp", "pixel_shuffle"):
            raise ValueError(f"projector kind must be linear, mlp or pixel_shuffle, got {self.kind!r}")
        if self.scale_factor < 1:
            raise ValueError(f"scale_factor must be >= 1, got {self.scale_factor}")

    def num_tokens(self, grid: tuple[int, int]) -> int:
        """Image tokens the LM sees for a (rows, cols) patch grid."""
        rows, cols = grid
        extra = int(self.pooled_token)
        if self.kind != "pixel_shuffle":
            return rows * cols + extra
        check_divisible(grid, self.scale_factor)
        return (rows // self.scale_factor) * (cols // self.scale_factor) + extra

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> ProjectorConfig:
        """From the dict `to_dict` wrote: every key must be a field and every value of its type, else a
        `CheckpointError` naming the key (`where` prefixes the name)."""
        return config_from_dict(cls, d, where, ignore_unknown=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_divisible(grid: tuple[int, int], factor: int) -> None:
    if grid[0] % factor or grid[1] % factor:
        raise ValueError(
            f"pixel_shuffle with scale_factor {factor} needs a patch grid divisible by {factor}, "
            f"got {grid[0]}x{grid[1]}; choose an image size whose grid is, or another scale_factor"
        )


def pixel_shuffle(x: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Space-to-depth: (B, rows*cols, D) -> (B, rows/f * cols/f, f*f*D), each f x f block -> one token."""
    B, N, D = x.shape
    rows, cols = grid
    check_divisible(grid, factor)
    x = x.view(B, rows // factor, factor, cols // factor, factor, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, rows/f, cols/f, f, f, D): the block's patches side by side
    return x.reshape(B, (rows // factor) * (cols // factor), factor * factor * D)


class Projector(nn.Module):
    """One module for the three kinds; the parameter names say which layers exist."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        d_in = config.vision_hidden_size * (config.scale_factor**2 if config.kind == "pixel_shuffle" else 1)
        self.linear_1 = nn.Linear(d_in, config.text_hidden_size, bias=config.bias)
        if config.kind == "mlp":
            self.act = nn.GELU()  # exact (erf) GELU: LLaVA's "gelu"
            self.linear_2 = nn.Linear(config.text_hidden_size, config.text_hidden_size, bias=config.bias)
        if config.pooled_token:
            self.pooled = nn.Linear(config.vision_hidden_size, config.text_hidden_size)

    @torch.no_grad()
    def match_output_scale(self, target_rms: float) -> None:
        """Initialise the last layer so that, for unit-variance features (the tower's layer-normed output),
        each output dimension has RMS `target_rms`: the LM's own token-embedding scale.

        With PyTorch's default init the image tokens come out ~10x larger than SmolLM2's token embeddings;
        they then dominate the residual stream they enter, and the LM learns to read them far more slowly.
        """
        last = [self.linear_2 if self.config.kind == "mlp" else self.linear_1]
        for layer in last + ([self.pooled] if self.config.pooled_token else []):
            layer.weight.normal_(0.0, target_rms / layer.in_features**0.5)
            if layer.bias is not None:
                layer.bias.zero_()

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int] | None = None, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, N, D_vision) patch embeddings of a row-major `grid` (square when None) -> (B, T, D_lm);
        `pooled` (B, D_vision), the tower's pooled embedding, is required with `pooled_token`."""
        if self.config.kind == "pixel_shuffle":
            side = math.isqrt(x.shape[1])
            x = pixel_shuffle(x, grid or (side, side), self.config.scale_factor)
        x = self.linear_1(x)
        if self.config.kind == "mlp":
            x = self.linear_2(self.act(x))
        if self.config.pooled_token:
            if pooled is None:
                raise ValueError("this projector has a pooled token: pass the tower's pooled embedding")
            x = torch.cat([self.pooled(pooled).unsqueeze(1), x], dim=1)  # (B, 1 + T, D_lm)
        return x
