"""Zero-shot classification and image-text retrieval with a SigLIP dual encoder, and `vlm zeroshot`.

    probs = zero_shot(model, tokenizer, ["cat.jpg"], ["a cat", "a dog"])     # (1, 2) sigmoid probabilities
    recall = retrieval(model, tokenizer, images, captions)                  # {"image_to_text@1": ..., ...}

References
- Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (SigLIP), 2023: zero-shot probabilities are
  sigmoid(t * cos(image, text) + b), each label judged on its own (a row need not sum to 1).
- Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), 2021,
  section 3.1.4: prompt ensembling. A label's embedding is the mean of its L2-normalised embeddings under
  several templates ("a photo of {}", "a picture of {}", ...), normalised again.

Texts are tokenized as the text tower needs: padded (and truncated) to exactly `max_position_embeddings`,
without an attention mask, as the model was trained (see `vlm/siglip_text.py`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from vlm.processing import ImageSource, SiglipImageProcessor, image_sequence
from vlm.siglip_model import SiglipModel, retrieval_recall
from vlm.weights import load_siglip_model, resolve_checkpoint

DEFAULT_TEMPLATES = ("a photo of {}.",)
# Where a trained dual encoder (model + tokenizer) ships, as `vlm.model.DEFAULT_MODEL_DIR` does for the VLM.
DEFAULT_SIGLIP_DIR = Path(__file__).resolve().parent / "default_siglip"
TRAIN_COMMAND = "python train/pretrain_siglip.py configs/siglip_tiny_offline.yaml"


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], length: int) -> torch.Tensor:
    """Texts -> (B, length) token ids, padded and truncated to exactly `length` (the text tower's
    `max_position_embeddings`: it pools the last position, so every text must end at the same place)."""
    return tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )["input_ids"]


def _param(model: SiglipModel) -> torch.Tensor:
    return next(model.parameters())


@torch.inference_mode()
def embed_images(
    model: SiglipModel, images: torch.Tensor | ImageSource | Sequence[ImageSource], batch_size: int = 64
) -> torch.Tensor:
    """Images (paths, PIL images, bytes, or preprocessed (B, 3, H, W) pixels; one image is a batch of one) ->
    (B, D) L2-normalised float32 embeddings. Images are preprocessed a batch at a time, so a long list never
    sits in memory as pixels."""
    images = images if isinstance(images, torch.Tensor) else image_sequence(images)
    param = _param(model)
    processor = SiglipImageProcessor(model.config.vision_config.image_size)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = chunk if isinstance(chunk, torch.Tensor) else processor(list(chunk))
        features = model.get_image_features(pixels.to(param.device, param.dtype))
        out.append(F.normalize(features.float(), dim=-1))
    if not out:
        return torch.empty(0, model.config.vision_config.hidden_size, device=param.device)
    return torch.cat(out)


@torch.inference_mode()
def embed_texts(
    model: SiglipModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """Texts -> (B, D) L2-normalised float32 embeddings."""
    param = _param(model)
    length = model.config.text_config.max_position_embeddings
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenize(tokenizer, texts[start : start + batch_size], length).to(param.device)
        out.append(F.normalize(model.get_text_features(ids).float(), dim=-1))
    if not out:
        return torch.empty(0, model.config.text_config.projection_size, device=param.device)
    return torch.cat(out)


def check_templates(templates: Sequence[str], what: str = "template") -> None:
    """Refuse a template that does not format with the label alone: it needs exactly one `{}` (or `{0}`) where
    the label goes, and a literal brace doubled (`{{`, `}}`). `ValueError` naming the template (as `what`)."""
    for template in templates:
        try:  # each replacement field's name: "" for {}, "x" for {x}
            places = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as err:  # an unmatched brace
            raise ValueError(f"{what} {template!r}: {err} (write a literal brace as {{{{ or }}}})") from None
        if not places:
            raise ValueError(f"{what} {template!r} needs {{}} where the label goes")
        if named := [name for name in places if name not in ("", "0")]:
            raise ValueError(f"{what} {template!r} names {{{named[0]}}}; it is given the label only, as {{}}")
        if len(places) > 1:
            raise ValueError(f"{what} {template!r} has {len(places)} places for the label: give it one {{}}")
        try:  # a format spec or conversion a string does not take ("{:d}", "{!x}")
            template.format("label")
        except (ValueError, IndexError, KeyError) as err:
            raise ValueError(f"{what} {template!r}: {err}") from None


def label_embeddings(
    model: SiglipModel,
    tokenizer: PreTrainedTokenizerBase,
    labels: str | Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """(C, D) one L2-normalised embedding per label: the normalised mean over `templates` of the label's
    normalised text embeddings (CLIP's prompt ensembling). With one template it is that text's embedding. A
    string alone is one label, or one template (never its letters)."""
    labels, templates = _texts(labels), _texts(templates)
    if not labels or not templates:
        raise ValueError("zero-shot needs at least one label and one template")
    check_templates(templates)
    texts = [template.format(label) for label in labels for template in templates]
    embeds = embed_texts(model, tokenizer, texts).view(len(labels), len(templates), -1)  # (C, T, D)
    return F.normalize(embeds.mean(1), dim=-1)


def _texts(texts: str | Sequence[str]) -> Sequence[str]:
    return [texts] if isinstance(texts, str) else texts


def zero_shot(
    model: SiglipModel,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor | ImageSource | Sequence[ImageSource],
    labels: str | Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> torch.Tensor:
    """(num_images, num_labels) probabilities that image i shows label j: sigmoid(t * cos + b), SigLIP's
    own reading of its logits. Each label is judged on its own, so a row need not sum to 1; classify with
    `argmax(-1)`. Several `templates` are averaged as CLIP does (see `label_embeddings`)."""
    classes = label_embeddings(model, tokenizer, labels, templates)  # (C, D)
    image_embeds = embed_images(model, images, batch_size)  # (N, D)
    scale, bias = model.logit_scale.detach().float().exp(), model.logit_bias.detach().float()
    return torch.sigmoid(image_embeds @ classes.T.to(image_embeds.device) * scale + bias)


def retrieval(
    model: SiglipModel,
    tokenizer: PreTrainedTokenizerBase,
    images: torch.Tensor | Sequence[ImageSource],
    texts: Sequence[str],
    ks: tuple[int, ...] = (1, 5),
    batch_size: int = 64,
) -> dict[str, float]:
    """Recall@k of image -> text and text -> image retrieval, where image i and text i are the pairs:
    {"image_to_text@1": ..., "text_to_image@1": ..., ...}. See `vlm.siglip_model.retrieval_recall` (ties
    count against the match). Duplicate texts make the task ambiguous: deduplicate them first."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: retrieval needs matching pairs")
    return retrieval_recall(embed_images(model, images, batch_size), embed_texts(model, tokenizer, texts), ks)


# -- `vlm zeroshot IMAGE --labels "a cat,a dog" [--model DIR]` ---------------------------------------------


def parse_labels(text: str) -> list[str]:
    """ "a cat, a dog,,a cat" -> ["a cat", "a dog"]: comma-separated, stripped, blanks and repeats dropped."""
    labels = list(dict.fromkeys(label.strip() for label in text.split(",") if label.strip()))
    if not labels:
        raise ValueError(f"no labels in {text!r}: give comma-separated labels, e.g. --labels 'a cat,a dog'")
    return labels


def load_dual_encoder(
    name_or_path: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[SiglipModel, PreTrainedTokenizerBase]:
    """A SigLIP dual encoder and its tokenizer from one folder (what `train/pretrain_siglip.py` writes to
    `<out_dir>/final`, or a hub id). None means the shipped default, `DEFAULT_SIGLIP_DIR`. The model goes to
    `device` (None: the CPU) in `dtype` (None: float32); the functions here move their inputs to it."""
    if name_or_path is None:
        if not (DEFAULT_SIGLIP_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"no SigLIP dual encoder ships at {DEFAULT_SIGLIP_DIR} yet: pass --model DIR (a folder with the "
                f"model and its tokenizer), e.g. runs/siglip_tiny_offline/final after `{TRAIN_COMMAND}`"
            )
        name_or_path = DEFAULT_SIGLIP_DIR
    folder = resolve_checkpoint(name_or_path, ["config.json", "*.safetensors", "*.json", "*.model"])
    return load_siglip_model(folder, dtype=dtype, device=device), load_tokenizer(folder)


# Tokenizer classes that are a plain `tokenizer.json` with nothing model-specific around it.
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a dual encoder's folder.

    A plain fast tokenizer (`tokenizer.json`, as `train/pretrain_siglip.py` writes) is loaded as that class.
    `AutoTokenizer` gives the same tokenizer but first reads config.json into transformers' `SiglipConfig`,
    and printing that config builds a default `SiglipTextConfig`, whose class defaults (bos 49406 and eos
    49407 in a 32,000-token vocabulary; transformers#47612) log two warnings about ids no file here holds.
    Other tokenizers (a hub SigLIP's sentencepiece one) go through `AutoTokenizer`."""
    folder = Path(folder)
    settings = folder / "tokenizer_config.json"
    named = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    if named in _PLAIN_TOKENIZERS and (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def format_scores(labels: Sequence[str], probs: torch.Tensor) -> str:
    """A table of label -> probability, most probable first (one image's row of `zero_shot`)."""
    rows = sorted(zip(labels, probs.tolist(), strict=True), key=lambda row: -row[1])
    width = max(len("label"), *(len(label) for label in labels))
    lines = [f"{'label':<{width}}  probability"]
    lines += [f"{label:<{width}}  {p:11.4f}" for label, p in rows]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_SIGLIP_DIR",
    "DEFAULT_TEMPLATES",
    "check_templates",
    "embed_images",
    "embed_texts",
    "format_scores",
    "label_embeddings",
    "load_dual_encoder",
    "load_tokenizer",
    "parse_labels",
    "retrieval",
    "tokenize",
    "zero_shot",
]
