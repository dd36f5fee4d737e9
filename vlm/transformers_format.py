"""Published VLM checkpoints in transformers' formats, in and out: key maps into our own modules.

Read (`read_checkpoint`, `write_lm`) and written (`export`):
- `Idefics3ForConditionalGeneration` and `SmolVLMForConditionalGeneration` (SmolVLM-256M/500M-Instruct): a SigLIP
  tower, a pixel-shuffle connector (one Linear without bias) and a Llama LM. Our `Projector` with
  `kind="pixel_shuffle", bias=False` is that connector: Idefics3's shuffle orders a block's patches row by row,
  channel = (i * f + j) * D + d, exactly as ours (tests/test_transformers_format.py checks it against transformers'
  own), so its Linear loads as is.
- `LlavaForConditionalGeneration` whose `vision_config` is SigLIP (llava-interleave-qwen-0.5b-hf): LLaVA's 2-layer
  MLP is our `mlp` projector; LLaVA reads `hidden_states[vision_feature_layer]`, before the tower's
  `post_layernorm`, so its -1 is our layer `num_hidden_layers` (our -1 is after `post_layernorm`).

The LM is never rebuilt here: its tensors are written once as a standalone transformers folder (`write_lm`, kept in
vlm's cache by `vlm.lm`), which then loads like any LM — in bf16, 4-bit, with LoRA.

Where Idefics3's vision tower differs from SigLIP: it has no pooling head, and its embeddings place the patches of
a partly padded image by bucketing their fractional coordinates (NaViT). Our processor makes whole tiles only, for
which the bucket of patch i is position i, except at grid sides where float rounding merges two buckets (19, 25,
29, 31, ... patches per side): there the position table is gathered on load (`idefics3_positions`), so that our
plain positions read the rows Idefics3 reads; such a tower cannot be exported back exactly, and is refused.

Strict like the rest of `vlm.weights`: every tensor is used once, and what does not fit is one `CheckpointError`.
No remote code: only architectures that ship with transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlm.checks import CheckpointError
from vlm.processing import ImageProcessing
from vlm.projector import ProjectorConfig
from vlm.siglip import SiglipVisionConfig
from vlm.weights import check_fits, read_config, read_json, read_safetensors

if TYPE_CHECKING:  # transformers is imported where it is used: this module's readers do not need it
    from transformers import PreTrainedTokenizerBase

IDEFICS3 = ("idefics3", "smolvlm")
FAMILIES = (*IDEFICS3, "llava")
# Tokens Idefics3's layout writes around each image (`vlm.conversation.ImagePrompt`); the row/col ones only when
# images are split.
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<global-img>")
# Where each part's tensors are, by the layouts transformers 4.x (the hub's checkpoints) and 5.x save.
PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "idefics3": {
        "vision": ("model.vision_model.",),
        "projector": ("model.connector.modality_projection.",),
        "lm.model": ("model.text_model.",),
        "lm.lm_head": ("lm_head.",),
    },
    "llava": {
        "vision": ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower."),
        "projector": ("multi_modal_projector.", "model.multi_modal_projector."),
        "lm.model": ("language_model.model.", "model.language_model."),
        "lm.lm_head": ("language_model.lm_head.", "lm_head."),
    },
}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def family_of(config: dict[str, Any]) -> str | None:
    """ "idefics3" (Idefics3 and SmolVLM, one format), "llava", or None for anything else."""
    model_type = config.get("model_type")
    if model_type in IDEFICS3:
        return "idefics3"
    return "llava" if model_type == "llava" else None


def is_transformers_vlm(folder: Path) -> bool:
    """Does `folder` hold a checkpoint of a family read here? (its config.json's model_type)"""
    return (folder / "config.json").is_file() and family_of(read_config(folder)) is not None


@dataclass(frozen=True)
class Imported:
    """A transformers VLM checkpoint as our modules' configs and tensors, and how it writes its prompts."""

    vision: SiglipVisionConfig
    projector: ProjectorConfig
    vision_state: dict[str, torch.Tensor]  # our tower's key names
    projector_state: dict[str, torch.Tensor]  # our Projector's key names
    image_token: str
    vision_feature_layer: int  # ours: -1 after post_layernorm, else an entry of the tower's hidden states
    image_processing: ImageProcessing
    image_layout: str  # "plain" | "idefics3"
    typed_parts: bool  # the chat template (the processor's) places typed image/text parts itself
    part_joiner: str = "\n"  # what joins a message's parts when the template does not place them


def hf_config(folder: Path) -> Any:
    """transformers' own config of the checkpoint (its defaults filled in: hub configs omit them)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:
        raise CheckpointError(f"{folder}/config.json is not a config transformers can read: {err}") from err


def check_family(config: dict[str, Any], folder: Path) -> str:
    """The checkpoint's family (`family_of`), or a `CheckpointError` naming what it is and what vlm reads."""
    family = family_of(config)
    if family is None:
        raise CheckpointError(
            f"{folder} holds a {config.get('model_type')!r} checkpoint; vlm reads its own model folders, SmolVLM / "
            "Idefics3 (model_type smolvlm, idefics3) and LLaVA with a SigLIP tower (llava)"
        )
    return family


def read_checkpoint(folder: Path, tokenizer: Any) -> Imported:
    """The vision tower, projector and prompt format of a transformers VLM checkpoint (`FAMILIES`); its LM is
    read by `write_lm`. `tokenizer` is the checkpoint's (image token ids -> their text)."""
    family = check_family(read_config(folder), folder)
    config = hf_config(folder)
    parts = split_state(folder, family, ("vision", "projector"))  # the LM's are read by `write_lm`
    image_token = _token(tokenizer, config.image_token_id, folder)
    processing = image_processing(folder, family)
    typed = renders_typed_images(tokenizer, image_token)
    if family == "llava":
        return _read_llava(folder, config, parts, image_token, processing, typed)
    imported = _read_idefics3(folder, config, parts, image_token, processing, typed)
    vocab = tokenizer.get_vocab()
    if not any(t in vocab for t in IDEFICS3_TOKENS):
        # No layout tokens at all: a model that writes each image as a plain run of image tokens, exported by vlm
        # (`save_processor`); it is read back as it was trained.
        if processing.image_splitting:
            raise CheckpointError(
                f"{folder}: image splitting needs Idefics3's tile tokens; the tokenizer has none"
            )
        return replace(imported, image_layout="plain")
    missing = [t for t in IDEFICS3_TOKENS if t not in vocab]
    if processing.image_splitting and "<row_1_col_1>" not in vocab:
        missing.append("<row_1_col_1>")
    if missing:
        raise CheckpointError(f"{folder}: the tokenizer lacks Idefics3's image tokens {', '.join(missing)}")
    return imported


def split_state(folder: Path, family: str, wanted: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors of the `wanted` parts ("vision", "projector", "lm.model", "lm.lm_head"), by part,
    their part's prefix stripped; only those are read. A tensor of no part is an error (nothing is dropped
    silently)."""
    stray: set[str] = set()

    def keep(key: str) -> bool:
        found = _part(key, family)
        if found is None:
            stray.add(key)
        return found is not None and found[0] in wanted

    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in wanted}
    for key, value in read_safetensors(folder, keep).items():
        part, prefix = _part(key, family)
        name = key.removeprefix(prefix)
        if name in parts[part]:  # two layouts in one file
            raise CheckpointError(f"{folder}: {part} tensor {name} appears twice (under two key layouts)")
        parts[part][name] = value
    if stray:
        raise CheckpointError(
            f"{folder}: tensors of no known part of a {family} model ({len(stray)}): {', '.join(sorted(stray)[:20])}"
        )
    return parts


def _part(key: str, family: str) -> tuple[str, str] | None:
    """(the part a checkpoint key belongs to, its prefix there), by the family's layouts (`PREFIXES`)."""
    return next(
        ((part, p) for part, prefixes in PREFIXES[family].items() for p in prefixes if key.startswith(p)),
        None,
    )


def _read_idefics3(
    folder: Path, config: Any, parts: dict, image_token: str, processing: ImageProcessing, typed: bool
) -> Imported:
    vc = config.vision_config
    vision = _vision_config(vc, vision_use_head=False, folder=folder)
    text_hidden = config.text_config.hidden_size
    tile = _tile_size(folder)
    if tile != vision.image_size:
        raise CheckpointError(
            f"{folder}: the processor cuts {tile}-px tiles but the tower reads {vision.image_size}-px images; vlm "
            "needs them equal (whole tiles, no padding)"
        )
    state = dict(parts["vision"])
    side = vision.image_size // vision.patch_size
    key = "embeddings.position_embedding.weight"
    if key in state:  # see the module docstring: where rounding merges buckets, read the rows Idefics3 reads
        state[key] = state[key][idefics3_positions(side)]
    projector = ProjectorConfig(
        vision.hidden_size, text_hidden, kind="pixel_shuffle", scale_factor=config.scale_factor, bias=False
    )
    return Imported(
        vision, projector, state, {f"linear_1.{k.removeprefix('proj.')}": v for k, v in parts["projector"].items()},
        image_token, -1, processing, "idefics3", typed,
    )  # fmt: skip


def _read_llava(
    folder: Path, config: Any, parts: dict, image_token: str, processing: ImageProcessing, typed: bool
) -> Imported:
    vc = config.vision_config
    if vc.model_type not in ("siglip_vision_model", "siglip"):
        raise CheckpointError(
            f"{folder}: this LLaVA's vision tower is {vc.model_type!r}; vlm's tower is SigLIP "
            "(vision_config.model_type siglip_vision_model)"
        )
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(
            f"{folder}: vision_feature_layer {layer} concatenates several layers; vlm's projector reads one"
        )
    if config.vision_feature_select_strategy != "full":
        raise CheckpointError(
            f"{folder}: vision_feature_select_strategy {config.vision_feature_select_strategy!r} drops the first "
            "patch (a CLIP CLS token; SigLIP has none); vlm reads every patch ('full')"
        )
    if config.projector_hidden_act != "gelu":
        raise CheckpointError(
            f"{folder}: projector_hidden_act {config.projector_hidden_act!r}; vlm's MLP uses gelu"
        )
    vision = _vision_config(vc, vision_use_head=getattr(vc, "vision_use_head", True), folder=folder)
    projector = ProjectorConfig(
        vision.hidden_size, config.text_config.hidden_size, kind="mlp",
        bias=getattr(config, "multimodal_projector_bias", True),
    )  # fmt: skip
    if processing.longest_edge is not None:
        raise CheckpointError(f"{folder}: a LLaVA processor that resizes by longest edge is not supported")
    ours = vision.num_hidden_layers if layer == -1 else layer  # LLaVA's -1 is before post_layernorm
    return Imported(
        vision, projector, dict(parts["vision"]), dict(parts["projector"]), image_token, ours,
        processing, "plain", typed,
    )  # fmt: skip


def _vision_config(vc: Any, vision_use_head: bool, folder: Path) -> SiglipVisionConfig:
    d = {k: getattr(vc, k) for k in SiglipVisionConfig.__dataclass_fields__ if hasattr(vc, k)}
    try:
        return SiglipVisionConfig(**{**d, "vision_use_head": vision_use_head})
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{folder}: the vision tower's config does not fit a SigLIP tower: {err}"
        ) from None


def idefics3_positions(side: int) -> torch.Tensor:
    """The position id Idefics3's embeddings give each patch of a whole (unpadded) square image of `side` x
    `side` patches: its bucketed fractional coordinates, computed as transformers computes them (float32)."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor(side)), max=1 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)  # (side,)
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1)


def renders_typed_images(tokenizer: Any, image_token: str) -> bool:
    """Does the tokenizer's chat template place typed image parts (`{"type": "image"}`) itself, as one image
    token each (a VLM processor's template)? A text LM's template prints such a list as text, without it."""
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that requires string content
        return False
    return text.count(image_token) == 1 and "probe" in text and "'type'" not in text


def _token(tokenizer: Any, token_id: Any, folder: Path) -> str:
    if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
        raise CheckpointError(f"{folder}: image token id {token_id!r} is not in its tokenizer")
    return tokenizer.convert_ids_to_tokens(token_id)


def processor_config(folder: Path) -> dict[str, Any]:
    """The image processor's settings: `preprocessor_config.json`, or the `image_processor` entry of
    transformers 5's `processor_config.json`; {} when there is neither."""
    for name in PROCESSOR_FILES:
        if (folder / name).is_file():
            d = read_json(folder / name, "")
            return d.get("image_processor", d) if isinstance(d.get("image_processor"), dict) else d
    return {}


def image_processing(folder: Path, family: str) -> ImageProcessing:
    """`ImageProcessing` from the checkpoint's processor config (the family's transformers defaults where a key
    is absent: Idefics3 resizes with Lanczos, longest edge 4 x 364, tiles of 364; SigLIP bicubic)."""
    d = processor_config(folder)
    resample = d.get("resample", 1 if family == "idefics3" else 3)
    mean, std = tuple(d.get("image_mean", (0.5,) * 3)), tuple(d.get("image_std", (0.5,) * 3))
    try:
        if family != "idefics3":
            size = d.get("size", {})
            if "shortest_edge" in size or d.get("do_center_crop"):
                raise CheckpointError(
                    f"{folder}: an image processor that crops is not supported (SigLIP squashes)"
                )
            return ImageProcessing(resample, mean, std)
        longest = (d.get("size") or {}).get("longest_edge", 4 * 364)
        return ImageProcessing(resample, mean, std, longest, bool(d.get("do_image_splitting", True)))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: unsupported image processor settings: {err}") from None


def _tile_size(folder: Path) -> int:
    return int((processor_config(folder).get("max_image_size") or {}).get("longest_edge", 364))


def chat_template(folder: Path) -> str | None:
    """The processor's chat template (the one that places images), from `chat_template.jinja`,
    `chat_template.json` or `processor_config.json`; None when the checkpoint has none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        if (folder / name).is_file():
            template = read_json(folder / name, "").get("chat_template")
            if isinstance(template, str):
                return template
    return None


# -- the LM, as a standalone transformers folder ----------------------------------------------------------


def checkpoint_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with its processor's chat template: what `write_lm` saves beside the LM."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    template = chat_template(folder)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def write_lm(folder: Path, out: Path) -> None:
    """Write the checkpoint's LM to `out` as a causal-LM folder (config.json, model.safetensors, tokenizer with
    the processor's chat template, generation config), every LM tensor checked against the architecture first."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = check_family(read_config(folder), folder)
    text_config = hf_config(folder).text_config
    parts = split_state(folder, family, ("lm.model", "lm.lm_head"))
    state = {f"model.{k}": v for k, v in parts["lm.model"].items()}
    state |= {f"lm_head.{k}": v for k, v in parts["lm.lm_head"].items()}
    # An absent head is the tied one (the embedding matrix); a stored one is used as stored.
    text_config.tie_word_embeddings = "lm_head.weight" not in state
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(text_config)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    if text_config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    check_fits(expected, state, f"the LM in {folder}")
    text_config.architectures = [type(skeleton).__name__]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(text_config.to_json_string(), encoding="utf-8")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    checkpoint_tokenizer(folder).save_pretrained(out)
    if (folder / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(folder).save_pretrained(out)


# -- export -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exportable:
    """What `export` needs of a model (a `VisionLanguageModel`'s parts, LoRA merged, full precision)."""

    vision: SiglipVisionConfig
    projector: ProjectorConfig
    vision_feature_layer: int
    image_token_id: int
    image_processing: ImageProcessing
    image_layout: str
    typed_parts: bool
    part_joiner: str
    vision_state: dict[str, torch.Tensor]
    projector_state: dict[str, torch.Tensor]
    lm: nn.Module  # a transformers causal LM
    tokenizer: Any


def target_family(model: Exportable) -> str:
    """The transformers class a model exports to, or a `ValueError` saying what would be needed."""
    if (
        model.image_processing.tiling != "idefics3"
        or model.image_layout == "nanovlm"
        or model.part_joiner != "\n"
    ):
        raise ValueError(
            "this model reads images and writes prompts as nanoVLM does (its tiles and their order, its image "
            "string joined to the text); no transformers processor does that, so the exported folder would see "
            "other pixels and prompts than the model was trained on: save it in the vlm format"
        )
    p = model.projector
    if p.pooled_token:
        raise ValueError(
            "this projector adds a pooled-embedding token, which no transformers VLM has; export needs a "
            "projector without pooled_token (retrain, or use the vlm format)"
        )
    if p.kind == "pixel_shuffle":
        if p.bias:
            raise ValueError(
                "a pixel_shuffle projector exports as Idefics3's connector, a Linear without bias; this one has a "
                "bias (train with projector bias: false to export it)"
            )
        side = model.vision.image_size // model.vision.patch_size
        if not torch.equal(idefics3_positions(side), torch.arange(side * side)):
            raise ValueError(
                f"Idefics3 buckets patch positions so that two merge at {side} patches per side: a tower of this "
                "grid has no exact Idefics3 counterpart"
            )
        return "idefics3"
    if p.kind == "mlp":
        if model.vision_feature_layer == -1:
            raise ValueError(
                "LLaVA reads the tower's hidden states before post_layernorm; this model reads its output after it "
                "(vision_feature_layer -1). Export needs a model trained on a hidden state (e.g. -2, LLaVA's choice)"
            )
        if model.image_layout != "plain":
            raise ValueError(
                "LLaVA writes each image as a plain run of image tokens; this model uses Idefics3's layout"
            )
        return "llava"
    raise ValueError(
        f"a {p.kind!r} projector has no transformers counterpart: LLaVA needs 'mlp' (Linear-GELU-Linear), "
        "Idefics3 'pixel_shuffle' without bias"
    )


def export(model: Exportable, directory: Path, write: Callable[[Path, nn.Module], None]) -> str:
    """Build the transformers model of `model`'s family around its tensors and write it into `directory` with
    `write(directory, hf_model)` (transformers' `save_pretrained`, so the layout is the installed version's),
    with the tokenizer and a processor config. Returns the family."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    family = target_family(model)
    lm = model.lm
    text = lm.config.to_dict()
    vision = {k: v for k, v in model.vision.to_dict().items()}
    if family == "idefics3":
        vision.pop("vision_use_head")
        config = AutoConfig.for_model(
            "idefics3", vision_config=vision, text_config=text, scale_factor=model.projector.scale_factor,
            image_token_id=model.image_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        # Idefics3's tower has no pooling head: ours, when it has one, is unused by this projector (no pooled
        # token), and is left out.
        state = {
            f"model.vision_model.{k}": v for k, v in model.vision_state.items() if not k.startswith("head.")
        }
        state |= {
            f"model.connector.modality_projection.proj.{k.removeprefix('linear_1.')}": v
            for k, v in model.projector_state.items()
        }
        state |= {
            f"model.text_model.{k.removeprefix('model.')}": v
            for k, v in lm.state_dict().items()
            if k.startswith("model.")
        }
    else:
        tokens = model.projector.num_tokens((model.vision.image_size // model.vision.patch_size,) * 2)
        layer = model.vision_feature_layer
        config = AutoConfig.for_model(
            "llava", vision_config={"model_type": "siglip_vision_model", **vision}, text_config=text,
            image_token_id=model.image_token_id, vision_feature_layer=layer,
            vision_feature_select_strategy="full", projector_hidden_act="gelu",
            multimodal_projector_bias=model.projector.bias, image_seq_length=tokens, tie_word_embeddings=False,
        )  # fmt: skip
        state = {f"model.vision_tower.{k}": v for k, v in model.vision_state.items()}
        state |= {f"model.multi_modal_projector.{k}": v for k, v in model.projector_state.items()}
        state |= {
            f"model.language_model.{k.removeprefix('model.')}": v
            for k, v in lm.state_dict().items()
            if k.startswith("model.")
        }
    head = lm.get_output_embeddings()
    state["lm_head.weight"] = head.weight
    hf = AutoModelForImageTextToText.from_config(config)
    check_fits({k: v.shape for k, v in hf.state_dict().items()}, state, "the exported model")
    hf.load_state_dict({k: v.detach().float() for k, v in state.items()}, strict=True)
    write(directory, hf.eval())
    save_processor(model, family, directory)
    return family


def save_processor(model: Exportable, family: str, directory: Path) -> None:
    """The tokenizer and transformers' own processor for the exported model, so that `AutoProcessor` writes its
    prompts and pixels as ours does: `LlavaProcessor` (plain runs of image tokens, SigLIP's processing) or
    `Idefics3Processor` (Idefics3's layout and tiles). A model that writes images as a plain run but exports as
    Idefics3 gets the image processor alone: Idefics3's processor would write a layout it never saw (build its
    prompts with `<image>` x tokens_per_image, as vlm does)."""
    from transformers import (
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    p, tile = model.image_processing, model.vision.image_size
    norm = dict(image_mean=list(p.image_mean), image_std=list(p.image_std), resample=p.resample)
    template = model.tokenizer.chat_template if model.typed_parts else None
    tokens = model.projector.num_tokens((tile // model.vision.patch_size,) * 2)
    if family == "llava":
        images = SiglipImageProcessorPil(size={"height": tile, "width": tile}, **norm)
        LlavaProcessor(
            images, model.tokenizer, patch_size=model.vision.patch_size,
            vision_feature_select_strategy="full", num_additional_image_tokens=0, chat_template=template,
        ).save_pretrained(directory)  # fmt: skip
        return
    images = Idefics3ImageProcessorPil(
        do_image_splitting=p.image_splitting, size={"longest_edge": p.longest_edge or tile},
        max_image_size={"longest_edge": tile}, **norm,
    )  # fmt: skip
    if model.image_layout != "idefics3":
        images.save_pretrained(directory)
        model.tokenizer.save_pretrained(directory)
        return
    Idefics3Processor(images, model.tokenizer, image_seq_len=tokens, chat_template=template).save_pretrained(
        directory
    )
