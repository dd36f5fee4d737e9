"""SigLIP text transformer, written from scratch in plain PyTorch.

References
- Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), 2023: a text tower trained jointly with
  the image tower; texts are padded to a fixed length and the last position is pooled.
- big_vision `models/proj/image_text/text_transformer.py`: bidirectional (not causal) pre-LN encoder,
  learned position embeddings, final layer norm, "last" token pooling, linear head.
- Hugging Face `transformers` `SiglipTextModel`: the reference this file is tested against, numerically.

Module and parameter names equal the Hugging Face checkpoint keys (minus the `text_model.` prefix):
`embeddings.token_embedding`, `embeddings.position_embedding`, `encoder.layers.{i}.*`, `final_layer_norm`,
`head`. The encoder layers are the vision tower's (`vlm.siglip.SiglipEncoderLayer`): the two towers share
one block, as in the reference; the text tower passes it the padding mask when it has one.

Pooling is the state of the LAST position, which for every text shorter than the model's length is a pad
token: the model was trained on texts padded to exactly `max_position_embeddings` (`padding="max_length"`),
so the pad token's state at that position is what the head learned to read. A shorter pad would pool a
different position, with a different position embedding, and give a silently wrong embedding.

Deliberate deviations from the reference
- Inputs whose length is not `max_position_embeddings` are refused (the reference accepts any length up to
  it and pools whatever position comes last; see above).
- No `position_ids` / `inputs_embeds` arguments: positions are always 0..N-1, as in training.
- `attention_mask` is accepted, as the reference does: 1 for real tokens, 0 for padding; padded keys are
  then hidden from every query (the pooled last position included, which is a pad query that now reads only
  the real tokens). The SigLIP checkpoints were trained WITHOUT a mask (big_vision passes none), but
  transformers 5's SigLIP tokenizer returns one, and `SiglipModel(**processor(...))` uses it; pass it
  only to match that usage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vlm.checks import config_from_dict, positive_int
from vlm.siglip import _ACTIVATIONS, SiglipEncoderLayer


@dataclass(frozen=True)
class SiglipTextConfig:
    """Shape of a SigLIP text tower. Field names and defaults are Hugging Face's `SiglipTextConfig`
    (the defaults are `google/siglip-base-patch16-224`'s text tower)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | list[int] | None = 49407
    projection_size: int | None = None  # the head's output width; None means hidden_size, as in the reference

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for name in (*sizes, "max_position_embeddings"):
            positive_int(getattr(self, name), name)
        if self.projection_size is not None:
            positive_int(self.projection_size, "projection_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if self.projection_size is None:  # a derived default, resolved once (the reference does the same)
            object.__setattr__(self, "projection_size", self.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> SiglipTextConfig:
        """Build from a Hugging Face `config.json` dict: a `SiglipModel` (reads its `text_config`) or a
        `SiglipTextModel` (top level). Keys this tower does not use are ignored; a value of the wrong type or
        against a rule is a `CheckpointError` naming its key (`where` prefixes the name)."""
        if isinstance(d, dict) and ("text_config" in d or "vision_config" in d):
            where = f"{where}.text_config" if where else "text_config"
            d = d["text_config"] if d.get("text_config") is not None else {}
        return config_from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SiglipTextOutput:
    """What the text encoder returns; attribute names follow `transformers`' `BaseModelOutputWithPooling`."""

    last_hidden_state: torch.Tensor  # (B, N, D), after final_layer_norm
    pooler_output: torch.Tensor  # (B, projection_size): head(last position's state)
    hidden_states: tuple[torch.Tensor, ...] | None = (
        None  # embeddings + each layer's output: L + 1 of (B, N, D)
    )
    attentions: tuple[torch.Tensor, ...] | None = None  # each layer's weights: L of (B, heads, N, N)


class SiglipTextEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding, one per position 0..N-1."""

    def __init__(self, config: SiglipTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (B, N, D) + (1, N, D): the caller has checked N == max_position_embeddings.
        return self.token_embedding(input_ids) + self.position_embedding.weight.unsqueeze(0)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) mask of 1 = token, 0 = padding -> (B, 1, 1, N) additive bias on the attention scores.

    Padded KEYS get the dtype's most negative value, so softmax gives them weight exp(-huge) = 0; the
    reference uses the same finite value (not -inf), which keeps an all-padding row finite (uniform)."""
    blocked = (attention_mask == 0)[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


class SiglipTextEncoder(nn.Module):
    """The SigLIP text tower: embeddings -> L bidirectional pre-LN layers -> final_layer_norm -> last position
    -> head.

    `encoder(input_ids)` returns a `SiglipTextOutput` with `.last_hidden_state` (B, N, D) and
    `.pooler_output` (B, projection_size), the un-normalised text embedding.
    """

    def __init__(self, config: SiglipTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipTextEmbeddings(config)
        self.encoder = nn.Module()  # a plain container, so the keys read `encoder.layers.{i}.*`
        # The vision tower's block, duck-typed: it reads only the fields both configs share.
        layers = (SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))  # type: ignore[arg-type]
        self.encoder.layers = nn.ModuleList(layers)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> SiglipTextOutput:
        """input_ids: (B, N) token ids padded to exactly N = `max_position_embeddings`;
        attention_mask: optional (B, N), 1 = token, 0 = padding (see the module docstring)."""
        length = self.config.max_position_embeddings
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, N), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] != length:
            raise ValueError(
                f"input_ids have length {input_ids.shape[1]} but this SigLIP text tower needs exactly {length}: "
                "it pools the LAST position, so texts must be padded to max length (tokenizer(..., "
                f'padding="max_length", max_length={length}, truncation=True)); a shorter pad silently pools '
                "the wrong position"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        x = self.embeddings(input_ids)  # (B, N, D)
        bias = None if attention_mask is None else padding_bias(attention_mask, x.dtype)
        hidden_states, attentions = [x], []
        for layer in self.encoder.layers:
            x, weights = layer(x, output_attentions, attention_mask=bias)
            hidden_states.append(x)
            attentions.append(weights)
        x = self.final_layer_norm(x)
        pooled = self.head(x[:, -1])  # (B, projection_size): the last position, a pad token for short texts
        return SiglipTextOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
