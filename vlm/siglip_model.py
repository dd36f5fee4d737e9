"""SigLIP dual encoder: the vision and text towers joined by a learnable temperature and bias.

References
- Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), 2023: L2-normalised embeddings,
  logits t * <x, y> + b with t = exp(t'), t' = log 10 and b = -10 at initialisation, sigmoid zero-shot
  probabilities (each label judged on its own, they need not sum to 1).
- Hugging Face `transformers` `SiglipModel`: the reference this file is tested against, numerically.

Parameter names equal the `SiglipModel` checkpoint keys (`vision_model.*`, `text_model.*`, `logit_scale`,
`logit_bias`), so loading is one strict `load_state_dict` of the whole file (`vlm.weights.load_siglip_model`;
this file, like the towers, knows nothing of files).

Deliberate deviations from the reference
- `logit_scale` and `logit_bias` start at the paper's log(10) and -10; transformers 5 starts both at 0.
- Texts must be padded to the text tower's max length (see `vlm/siglip_text.py`).
- `forward` needs both images and texts (use `get_image_features` / `get_text_features` for one side), and
  returns a small dataclass without the towers' full outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.checks import CheckpointError, json_object
from vlm.losses import sigmoid_loss
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
from vlm.siglip_text import SiglipTextConfig, SiglipTextEncoder


@dataclass(frozen=True)
class SiglipConfig:
    """Shape of a SigLIP dual encoder: Hugging Face's `SiglipConfig`, a text and a vision config."""

    text_config: SiglipTextConfig = field(default_factory=SiglipTextConfig)
    vision_config: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)

    def __post_init__(self) -> None:
        if not self.vision_config.vision_use_head:
            raise ValueError(
                "a SigLIP dual encoder needs the vision tower's pooling head (vision_use_head=True)"
            )
        if self.text_config.projection_size != self.vision_config.hidden_size:
            raise ValueError(
                f"text projection_size {self.text_config.projection_size} must equal the vision hidden_size "
                f"{self.vision_config.hidden_size}: image and text embeddings are compared by dot product"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiglipConfig:
        """Build from a `SiglipModel` `config.json` dict; missing sub-configs take the defaults, as in HF. A
        value of the wrong type or against a rule is a `CheckpointError` naming its key."""
        d = json_object(d, "the config")
        text = SiglipTextConfig.from_dict({"text_config": d.get("text_config")})
        vision = SiglipVisionConfig.from_dict({"vision_config": d.get("vision_config")})
        try:
            return cls(text, vision)
        except ValueError as err:  # the towers do not fit each other
            raise CheckpointError(str(err)) from None

    def to_dict(self) -> dict[str, Any]:
        return {"text_config": self.text_config.to_dict(), "vision_config": self.vision_config.to_dict()}


@dataclass
class SiglipOutput:
    """What `SiglipModel.forward` returns; names follow transformers' `SiglipOutput`."""

    logits_per_image: torch.Tensor  # (B_img, B_txt): t * cos(image i, text j) + b
    logits_per_text: torch.Tensor  # (B_txt, B_img): the transpose
    image_embeds: torch.Tensor  # (B_img, D), L2-normalised
    text_embeds: torch.Tensor  # (B_txt, D), L2-normalised
    loss: torch.Tensor | None = None  # the sigmoid loss, when return_loss=True


class SiglipModel(nn.Module):
    """SigLIP: `vision_model` (images -> pooled (B, D)) and `text_model` (texts -> pooled (B, D)), compared
    by cosine similarity, scaled by exp(`logit_scale`) and shifted by `logit_bias`."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionEncoder(config.vision_config)
        self.text_model = SiglipTextEncoder(config.text_config)
        # Shape (1,) as in the checkpoints. t' = log 10 and b = -10: see the module docstring and losses.py.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) pooled image embeddings, NOT normalised (the reference's `pooler_output`)."""
        return self.vision_model(pixel_values, interpolate_pos_encoding).pooler_output

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) token ids padded to max length -> (B, D) pooled text embeddings, NOT normalised."""
        return self.text_model(input_ids, attention_mask).pooler_output

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> SiglipOutput:
        """Images (B_img, C, H, W) and texts (B_txt, N) -> all-pairs logits. `return_loss=True` adds the sigmoid
        loss, which reads image i and text i as the matching pairs (so it needs B_img == B_txt)."""
        if input_ids is None or pixel_values is None:
            raise ValueError(
                "SiglipModel.forward compares images with texts and needs both input_ids and pixel_values; "
                "use get_image_features / get_text_features for one side"
            )
        image_embeds = F.normalize(self.get_image_features(pixel_values, interpolate_pos_encoding), dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_text = (
            text_embeds @ image_embeds.T * self.logit_scale.exp() + self.logit_bias
        )  # (B_txt, B_img)
        loss = None
        if return_loss:
            loss = sigmoid_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
        return SiglipOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            loss=loss,
        )

    @torch.inference_mode()
    def zero_shot(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B_img, B_txt) probabilities that image i shows text j: sigmoid(logits_per_image).

        Each label is judged on its own (SigLIP's binary view), so a row need not sum to 1: an image can fit
        several labels, or none. Use `argmax(-1)` to classify."""
        return torch.sigmoid(self(input_ids, pixel_values, attention_mask).logits_per_image)


@torch.no_grad()
def retrieval_recall(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Recall@k for image -> text and text -> image retrieval, where image i and text i are the pairs.

    Embeddings (B, D) are compared by cosine similarity (the model's logits are a monotone map of it, so the
    ranking is the same). Recall@k is the fraction of queries whose match ranks in the top k. Ties count
    AGAINST the match: its rank is the number of other candidates scoring >= it, so a collapsed model (all
    embeddings equal) scores 0, not 1. Returns {"image_to_text@k": ..., "text_to_image@k": ...}."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"need (B, D) image and text embeddings of one shape, got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    scores = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T  # (B, B)
    matched = scores.diagonal()
    others = ~torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    # rank of the match (0 = first) = how many other candidates score at least as high
    image_rank = ((scores >= matched[:, None]) & others).sum(1)  # each image ranks all texts (a row)
    text_rank = ((scores >= matched[None, :]) & others).sum(0)  # each text ranks all images (a column)
    out = {}
    for k in ks:
        out[f"image_to_text@{k}"] = (image_rank < k).float().mean().item()
        out[f"text_to_image@{k}"] = (text_rank < k).float().mean().item()
    return out
