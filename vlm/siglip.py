"""SigLIP vision transformer, written from scratch in plain PyTorch.

References
- Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), 2023.
- Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT), 2021: patches as tokens, pre-LN encoder.
- Hugging Face `transformers` `SiglipVisionModel`: the reference this file is tested against, numerically.

Module and parameter names equal the Hugging Face checkpoint keys (minus the `vision_model.` prefix), so
loading a real checkpoint is "strip the prefix, strict `load_state_dict`": `vlm.weights.load_vision_encoder`
does it. The tower itself is plain torch and imports nothing of `vlm` (no files, no image decoding).

Deliberate deviations from the reference
- No attention-backend registry: one `Attention.forward` with two plain paths, fused
  `scaled_dot_product_attention` (default) and a written-out path that also returns the attention weights
  (and is the faster one for bf16 on CPU).
- The pooling head's attention is written out instead of calling `nn.MultiheadAttention`; it keeps that
  module's parameter names (`in_proj_weight`, `in_proj_bias`, `out_proj`) so checkpoints load unchanged,
  and it can return the probe's attention over the patches (the demo's heatmap).
- q/k/v run as one matmul on a concatenation of the three weights, while the checkpoint keeps its three
  separate projections. Measured on CPU: as fast as three matmuls, and the concatenation each call costs
  ~3% of the qkv matmul, too little to justify caching a derived weight that load_state_dict, .to() and
  training would all have to invalidate.
- Inference on CPU (no autograd) runs every linear through oneDNN with the bias, the GELU and the
  residual add fused into the matmul (`linear` below); `bench/encoder.py` measures it against transformers.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.checks import config_from_dict, positive_int

# hidden_act -> F.gelu's `approximate`, which is also the name oneDNN gives the same GELU ("tanh" or "none").
_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu": "none"}  # SigLIP uses the tanh one


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, then `F.gelu(approximate=gelu)` if `gelu` is given, or `+ residual`.

    On CPU without autograd (inference) this calls oneDNN's linear, `torch.ops.mkldnn._linear_pointwise`
    (the kernel `torch.compile` emits for CPU linears), instead of `F.linear`. Why:
    - fp32 `F.linear` runs MKL's sgemm, which takes its AVX2 code path on AMD CPUs, while oneDNN uses
      AVX-512: the base tower's fp32 forward went from 2.8 to 1.4 s (batch 8, one Zen 5 core).
    - oneDNN applies the bias, the GELU and the residual add to each output tile while it is in cache,
      instead of extra passes over (B, N, D) or (B, N, 3072) tensors: -9% (GELU, bias) and -5% (residual)
      on the bf16 forward.
    The op has no backward, so training (and every other device or dtype) takes the plain path. In fp32 the
    two paths round differently, by ~2e-6 per matmul and within 1e-5 of transformers after the 12 layers.

    Which kernel is faster depends on the CPU, not on its vendor alone (an Intel Xeon with AMX runs bf16
    `torch.mm` at 1,652 GFLOP/s and this oneDNN linear at 705; an AVX2-only EPYC has no bf16 path at all), so
    the choice is measured on the machine at hand, once per dtype and process (`kernel_choice`).
    """
    if (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        # inductor picks its own kernels (and lowers this op only for frozen weights)
        and not torch.compiler.is_compiling()
        and kernel_choice(x.dtype) == "onednn"
    ):
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return torch.ops.mkldnn._linear_pointwise(
            x, weight, bias, "none" if gelu is None else "gelu", [], gelu or ""
        )
    x = F.linear(x, weight, bias)
    if gelu is not None:
        x = F.gelu(x, approximate=gelu)
    return x if residual is None else residual + x


_CHOICES: dict[torch.dtype, str] = {}  # dtype -> "onednn" or "aten", measured once per process


def kernel_choice(dtype: torch.dtype) -> str:
    """The faster of oneDNN's fused linear ("onednn") and `F.linear` + GELU ("aten") for CPU inference in
    `dtype`, timed on a SigLIP-B MLP shape (784 tokens x 768 -> 3,072, GELU) the first time it is asked:
    three interleaved rounds, median, ~0.3 s once per process (kept in memory only: a tower knows nothing
    of files). `pin_kernel` decides instead."""
    if dtype not in _CHOICES:
        _CHOICES[dtype] = _measure(dtype) if dtype in _onednn_dtypes() else "aten"
    return _CHOICES[dtype]


def pin_kernel(dtype: torch.dtype, choice: str) -> None:
    """Use `choice` ("onednn" or "aten") for CPU inference in `dtype` from now on, instead of measuring (to
    compare the two, or to make a run independent of a timing)."""
    if choice not in ("onednn", "aten"):
        raise ValueError(f"choice must be 'onednn' or 'aten', got {choice!r}")
    if choice == "onednn" and dtype not in _onednn_dtypes():
        raise ValueError(f"oneDNN's fused linear does not run {dtype} on this CPU")
    _CHOICES[dtype] = choice


def _measure(dtype: torch.dtype) -> str:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(784, 768, generator=generator).to(dtype)
    weight, bias = torch.randn(3072, 768, generator=generator).to(dtype), torch.zeros(3072, dtype=dtype)
    kernels = {
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh"),
        "aten": lambda: F.gelu(F.linear(x, weight, bias), approximate="tanh"),
    }
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.no_grad():
        for kernel in kernels.values():  # warm-up: first calls allocate and pick code paths
            kernel()
        for _ in range(3):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                kernel()
                times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: sorted(times[name])[1])


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return ()
    # bf16 only where the CPU has bf16 instructions; elsewhere oneDNN would emulate it slowly
    return (
        (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    )


# The config fields that count something: each must be an integer >= 1 (0 heads would divide by zero).
_SIZES = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size",
)  # fmt: skip


@dataclass(frozen=True)
class SiglipVisionConfig:
    """Shape of a SigLIP vision tower. Field names are Hugging Face's `SiglipVisionConfig` keys.

    Defaults are `google/siglip-base-patch16-224`.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    vision_use_head: bool = True

    def __post_init__(self) -> None:
        for name in _SIZES:
            positive_int(getattr(self, name), name)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> SiglipVisionConfig:
        """Build from a Hugging Face `config.json` dict: a `SiglipModel` (reads its `vision_config`) or a
        `SiglipVisionModel` (top level). Keys this tower does not use (ids, dtypes, ...) are ignored; a value of
        the wrong type or against a rule is a `CheckpointError` naming its key (`where` prefixes the name)."""
        if isinstance(d, dict) and "vision_config" in d:
            where = f"{where}.vision_config" if where else "vision_config"
            d = d["vision_config"] if d["vision_config"] is not None else {}
        return config_from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiglipVisionOutput:
    """What the encoder returns; attribute names follow `transformers`' `BaseModelOutputWithPooling`."""

    last_hidden_state: torch.Tensor  # (B, N, D), after post_layernorm
    pooler_output: torch.Tensor | None = None  # (B, D), None when the model has no head
    # the embeddings and each layer's output: L + 1 of (B, N, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None  # each layer's weights: L of (B, heads, N, N)
    head_attentions: torch.Tensor | None = None  # the pooling probe's weights over patches: (B, heads, N)


class SiglipVisionEmbeddings(nn.Module):
    """Patches -> tokens: a Conv2d with kernel = stride = patch is one linear map per patch."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def position_grid(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a (height // patch) x (width // patch) grid: (1, N, D).

        The learned grid is square; other sizes get a bicubic resize of it, as the reference does."""
        weight = self.position_embedding.weight  # (grid*grid, D)
        rows, cols = height // self.patch_size, width // self.patch_size
        if (rows, cols) == (self.grid, self.grid):
            return weight.unsqueeze(0)
        dim = weight.shape[-1]
        grid = weight.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, h, w)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, N, D), row-major over the patch grid
        if interpolate_pos_encoding:
            return tokens + self.position_grid(height, width)
        if tokens.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(
                f"a {height}x{width} image gives {tokens.shape[1]} patches but the model has "
                f"{self.position_embedding.num_embeddings} positions ({self.grid}x{self.grid}); resize the "
                "image or pass interpolate_pos_encoding=True"
            )
        return tokens + self.position_embedding.weight.unsqueeze(0)


def project(
    layer: nn.Module, x: torch.Tensor, gelu: str | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`layer(x)`, then the GELU or residual of `linear`. A plain `nn.Linear` takes `linear`'s fused kernel; a
    wrapped one (peft's LoRA on the tower, a quantised layer) is called, since its weight alone is not what it
    computes."""
    if type(layer) is nn.Linear:
        return linear(x, layer.weight, layer.bias, gelu=gelu, residual=residual)
    y = layer(x)
    if gelu is not None:
        y = F.gelu(y, approximate=gelu)
    return y if residual is None else y + residual


class SiglipAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (the checkpoint's layout)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(
        self,
        x: torch.Tensor,
        output_attentions: bool = False,
        residual: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, D) -> (`residual` +) attention output (B, N, D), and the weights if asked for.

        `attention_mask`: an additive bias on the scores, broadcast to (B, heads, N, N), e.g. the text
        tower's padding bias (`vlm.siglip_text.padding_bias`); images need none."""
        B, N, D = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in projections):
            # One GEMM for q, k and v (see module docstring), then split heads: 3 x (B, heads, N, head_dim).
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = linear(x, weight, bias)
        else:  # a wrapped projection (peft's LoRA, a quantised layer) computes more than its weight: call it
            qkv = torch.cat([p(x) for p in projections], dim=-1)
        qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dropout = self.dropout if self.training else 0.0
        # The written-out path when the weights are wanted (visualisations), and for bf16 on CPU, where two
        # batched matmuls and a softmax beat sdpa's fused CPU kernel at ViT lengths (-7% on the bf16 forward,
        # 196 tokens); in fp32 sdpa is the faster one, and it never materialises (B, heads, N, N).
        if output_attentions or (x.device.type == "cpu" and x.dtype == torch.bfloat16):
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, heads, N, N)
            if attention_mask is not None:
                scores = scores + attention_mask
            # In fp32 as the reference does: a bf16 softmax computes in fp32 inside and rounds once, so it
            # matches fp32-then-round but skips an fp32 copy of the scores (with which this path was slower
            # than sdpa: 2x the bytes, and fresh pages from the allocator each layer).
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout, training=self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, heads * head_dim)
        out = project(self.out_proj, out, residual=residual)
        return out, weights if output_attentions else None


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.gelu = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., D) -> (`residual` +) fc2(gelu(fc1(x)))."""
        x = project(self.fc1, x, gelu=self.gelu)  # (..., intermediate)
        return project(self.fc2, x, residual=residual)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x + attn(ln(x)), then x + mlp(ln(x)); passing x as `residual` lets the add ride in the last GEMM
        x, weights = self.self_attn(
            self.layer_norm1(x), output_attentions, residual=x, attention_mask=attention_mask
        )
        x = self.mlp(self.layer_norm2(x), residual=x)
        return x, weights


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipMultiheadAttentionPoolingHead(nn.Module):
    """MAP head: one learned probe token attends over all patches, then a residual MLP.

    Parameter names are those of `nn.MultiheadAttention` (`attention.in_proj_weight` stacks Wq; Wk; Wv),
    which is what the checkpoints hold."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.probe = nn.Parameter(torch.randn(1, 1, d))
        self.attention = nn.Module()
        self.attention.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.attention.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.attention.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.attention.in_proj_weight)  # nn.MultiheadAttention's init
        self.layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, D) -> pooled (B, D) and the probe's attention weights (B, heads, N)."""
        B, N, D = x.shape
        h, hd = self.num_heads, D // self.num_heads
        wq, wk, wv = self.attention.in_proj_weight.chunk(3)
        bq, bk, bv = self.attention.in_proj_bias.chunk(3)
        q = F.linear(self.probe, wq, bq).view(1, 1, h, hd).transpose(1, 2)  # (1, heads, 1, hd)
        k = linear(x, wk, bk).view(B, N, h, hd).transpose(1, 2)  # (B, heads, N, hd)
        v = linear(x, wv, bv).view(B, N, h, hd).transpose(1, 2)
        weights = ((q @ k.transpose(-2, -1)) / math.sqrt(hd)).softmax(dim=-1)  # (B, heads, 1, N)
        pooled = (weights @ v).transpose(1, 2).reshape(B, 1, D)
        pooled = linear(pooled, self.attention.out_proj.weight, self.attention.out_proj.bias)
        pooled = self.mlp(self.layernorm(pooled), residual=pooled)  # pooled + mlp(ln(pooled))
        return pooled[:, 0], weights[:, :, 0]


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """SigLIP's initialisation (big_vision, as transformers reproduces it), for training from scratch.

    It matters: PyTorch's default N(0, 1) position embeddings are ~10x the patch embeddings, so every image
    starts out as nearly the same sequence of position vectors (cosine ~0.99 between any two images)."""
    if isinstance(module, SiglipVisionEmbeddings):
        nn.init.normal_(module.position_embedding.weight, std=module.position_embedding.embedding_dim**-0.5)
    elif isinstance(module, nn.Embedding):  # the text tower's token embeddings
        nn.init.normal_(module.weight, std=module.embedding_dim**-0.5)
    elif isinstance(module, SiglipAttention):
        for proj in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
    elif isinstance(module, SiglipMLP):
        for fc in (module.fc1, module.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
    elif isinstance(module, SiglipMultiheadAttentionPoolingHead):
        nn.init.xavier_uniform_(module.probe)
        nn.init.xavier_uniform_(module.attention.in_proj_weight)
        nn.init.zeros_(module.attention.in_proj_bias)
    elif isinstance(module, nn.Conv2d):  # lecun normal: std = 1 / sqrt(fan_in)
        nn.init.normal_(module.weight, std=(module.weight[0].numel()) ** -0.5)
        nn.init.zeros_(module.bias)


class SiglipVisionEncoder(nn.Module):
    """The SigLIP vision tower: embeddings -> L pre-LN layers -> post_layernorm (-> MAP head).

    `encoder(pixel_values)` returns a `SiglipVisionOutput` with `.last_hidden_state` (B, N, D) and
    `.pooler_output` (B, D), or None when `config.vision_use_head` is False.
    """

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = SiglipMultiheadAttentionPoolingHead(config) if config.vision_use_head else None
        self.apply(init_weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SiglipVisionOutput:
        """pixel_values: (B, C, H, W), normalised as `vlm.processing` does (mean = std = 0.5)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (B, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        hidden_states, attentions = [x], []
        for layer in self.encoder.layers:
            x, weights = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(weights)
        x = self.post_layernorm(x)
        pooled, head_weights = self.head(x) if self.head is not None else (None, None)
        return SiglipVisionOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            head_attentions=head_weights if output_attentions else None,
        )

    @torch.inference_mode()
    def embed(self, pixel_values: torch.Tensor, pooled: bool = True, batch_size: int = 32) -> torch.Tensor:
        """Preprocessed pixels (B, C, H, W) -> float32 embeddings, `batch_size` images at a time.

        Returns (B, D) pooled embeddings (the MAP head's output; the mean of the patch tokens when the model
        has no head), or (B, N, D) patch embeddings with `pooled=False`. Files and PIL images:
        `vlm.embeddings.embed_images`, which preprocesses them and calls this."""
        param = next(self.parameters())
        outs = []
        for batch in pixel_values.split(batch_size):
            out = self(batch.to(param.device, param.dtype))
            if not pooled:
                outs.append(out.last_hidden_state)
            else:
                outs.append(
                    out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
                )
        return torch.cat(outs).float()
