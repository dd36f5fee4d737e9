"""Tiny random `transformers` VLM checkpoints saved to a folder as a hub repo holds them, and what
`transformers` itself answers for them (the reference an importer/exporter is tested against). No downloads:
the tokenizer is SmolLM2's real one (the `smollm2_folder` fixture), everything else is built here.

Families, as the hub holds them:
- "idefics3": Idefics3ForConditionalGeneration + Idefics3Processor (SmolVLM-256M/500M-Instruct's layout).
- "smolvlm": SmolVLMForConditionalGeneration + SmolVLMProcessor (SmolVLM2's layout). transformers' own
  SmolVLMProcessor needs torchvision (its video processor) and num2words, neither of which we install, so
  `load_processor` reads such a folder with Idefics3Processor: for images the two run the same code (the
  SmolVLM and Idefics3 image processors are one generated file; the image-token expansion is one function).
- "llava": LlavaForConditionalGeneration with a SigLIP tower + LlavaProcessor (llava-interleave-qwen's layout:
  ChatML turns, `<image>\\n` before the text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipImageProcessorPil,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
)
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import is_num2words_available, is_torchvision_available

FAMILIES = ("idefics3", "smolvlm", "llava")

# Idefics3/SmolVLM prompt tokens: the processors expand each `<image>` of the prompt into
# `<fake_token_around_image>` (+ `<row_i_col_j>` per tile) + `<image>` * image_seq_len ... `<global-img>` ...
# and the chat template ends each turn with `<end_of_utterance>`. Tiles go up to 6 x 6.
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]

# The hub SmolVLM template (HuggingFaceTB/SmolVLM-256M-Instruct; transformers' smolvlm DEFAULT_CHAT_TEMPLATE
# less video): "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:". No space after "User:" when
# the turn opens with an image, none after "Assistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# ChatML with every image part as "<image>\n" ahead of the turn's text (as llava-interleave-qwen's template).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
TINY_TEXT: dict[str, Any] = dict(
    model_type="llama",
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def tokenizer_for(family: str, smollm2_folder: Path | str):
    """SmolLM2's tokenizer with the family's image tokens added (special, so each is one id and
    skip_special_tokens drops it), and the family's chat template set on it too: the saved tokenizer and
    processor then agree on the template."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    names = ["<image>"] if family == "llava" else IDEFICS3_TOKENS
    tokens = [AddedToken(name, normalized=False, special=True) for name in names]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE if family == "llava" else SMOLVLM_CHAT_TEMPLATE
    return tokenizer


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random values everywhere (biases and norms too, so a swapped or missing one shows in a parity test)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def save_tiny_vlm(
    folder: Path,
    family: str,
    smollm2_folder: Path | str,
    *,
    splitting: bool = False,
    vision_image_size: int = 32,
    patch_size: int = 8,
    scale_factor: int = 2,
    longest_edge: int | None = None,
    seed: int = 0,
    legacy_layout: bool = False,
    **overrides: Any,
) -> Path:
    """Build a tiny random `family` VLM and save model, tokenizer, processor and chat template to `folder`
    (safetensors), as the hub repo would hold them; returns `folder`.

    `splitting`, `longest_edge` and `scale_factor` are the Idefics3/SmolVLM image processor's
    `do_image_splitting`, `size={"longest_edge": ...}` (default 2 * vision_image_size) and pixel-shuffle
    factor; the tile (`max_image_size`) is the tower's `vision_image_size`. `overrides` are top-level model
    config keys (e.g. `vision_feature_layer=-2`, `vision_feature_select_strategy="default"` for LLaVA);
    `vision_config=`/`text_config=` dicts update the tiny sub-configs.

    `legacy_layout=True` rewrites the folder as transformers 4.x saved it, which is what most hub repos hold:
    see `to_legacy_layout`. transformers 5 reads both layouts to the same model and processor."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "llava" and (splitting or longest_edge is not None):
        raise ValueError(
            "splitting and longest_edge are Idefics3/SmolVLM image-processor settings, not LLaVA's"
        )
    folder = Path(folder)
    tokenizer = tokenizer_for(family, smollm2_folder)
    vision = {**TINY_VISION, "image_size": vision_image_size, "patch_size": patch_size}
    vision.update(overrides.pop("vision_config", {}))
    text = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text.update(overrides.pop("text_config", {}))

    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        if family == "llava":
            model, processor = _llava(tokenizer, vision, text, overrides)
        else:
            size = {"longest_edge": longest_edge or 2 * vision_image_size}
            model, processor = _idefics3(
                family, tokenizer, vision, text, scale_factor, splitting, size, overrides
            )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if family == "smolvlm":
        _name_smolvlm_processor(folder)
    if legacy_layout:
        to_legacy_layout(folder)
    return folder


def _idefics3(family, tokenizer, vision, text, scale_factor, splitting, size, overrides):
    config_class, model_class = (
        (Idefics3Config, Idefics3ForConditionalGeneration)
        if family == "idefics3"
        else (SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    config._attn_implementation = "eager"
    model = randomize_(model_class(config)).eval()
    tile = vision["image_size"]
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=splitting,
        max_image_size={"longest_edge": tile},  # one tile: what the tower sees
        size=size,  # the whole image's longest edge before tiling (scaled up or down to it)
    )
    image_seq_len = (tile // vision["patch_size"]) ** 2 // scale_factor**2
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE
    )
    return model, processor


def _llava(tokenizer, vision, text, overrides):
    settings = dict(
        vision_feature_select_strategy="full", vision_feature_layer=-1, projector_hidden_act="gelu"
    )
    settings.update(overrides)
    config = LlavaConfig(
        vision_config={"model_type": "siglip_vision_model", **vision},
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision["image_size"] // vision["patch_size"]) ** 2,  # unused by forward; kept true
        tie_word_embeddings=False,
        **settings,
    )
    config._attn_implementation = "eager"
    model = randomize_(LlavaForConditionalGeneration(config)).eval()
    side = vision["image_size"]
    image_processor = SiglipImageProcessorPil(
        size={"height": side, "width": side},
        resample=Image.Resampling.BICUBIC,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=0,
    )
    return model, processor


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _name_smolvlm_processor(folder: Path) -> None:
    """Name the saved processor classes after SmolVLM's, as a SmolVLM2 repo names them (we build the
    processor as Idefics3Processor, which makes the same inputs; see the module docstring)."""

    def rename(data: dict) -> None:
        data["processor_class"] = "SmolVLMProcessor"
        data["image_processor"]["image_processor_type"] = "SmolVLMImageProcessor"

    _edit_json(folder / "processor_config.json", rename)
    _edit_json(folder / "tokenizer_config.json", lambda data: data.update(processor_class="SmolVLMProcessor"))


def to_legacy_layout(folder: Path) -> None:
    """Rewrite a folder saved by transformers 5 as transformers 4.x wrote it (SmolVLM-256M-Instruct,
    llava-interleave-qwen-0.5b-hf): the image processor flat in preprocessor_config.json,
    processor_config.json with the processor's own keys only, chat_template.json (and the tokenizer's
    template in tokenizer_config.json) instead of chat_template.jinja, `torch_dtype` and `rope_theta` in
    config.json, and LLaVA's SigLIP weights under `vision_tower.vision_model.` (transformers 5 drops the
    `vision_model.`)."""
    folder = Path(folder)
    processor = json.loads((folder / "processor_config.json").read_text())
    image_processor = {**processor.pop("image_processor"), "processor_class": processor["processor_class"]}
    (folder / "preprocessor_config.json").write_text(
        json.dumps(image_processor, indent=2, sort_keys=True) + "\n"
    )
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    _edit_json(folder / "tokenizer_config.json", lambda data: data.update(chat_template=template))

    def old_config(data: dict) -> None:
        data["torch_dtype"] = data.pop("dtype")
        # transformers 5 saves Idefics3/SmolVLM's deprecated top-level pad_token_id as "_pad_token_id".
        if "_pad_token_id" in data:
            data["pad_token_id"] = data.pop("_pad_token_id")
        text = data["text_config"]
        text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]

    _edit_json(folder / "config.json", old_config)
    if json.loads((folder / "config.json").read_text())["model_type"] == "llava":
        weights = load_file(folder / "model.safetensors")
        weights = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in weights.items()}
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def load_processor(folder: Path | str):
    """`AutoProcessor.from_pretrained(folder)`; for a SmolVLM folder where transformers' SmolVLMProcessor
    cannot be built (no torchvision / num2words), Idefics3Processor over the same files (same image code)."""
    folder = Path(folder)
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    if model_type == "smolvlm" and not (is_torchvision_available() and is_num2words_available()):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
        return Idefics3Processor(
            SmolVLMImageProcessorPil.from_pretrained(folder),
            tokenizer,
            image_seq_len=image_seq_len,
            chat_template=tokenizer.chat_template,
        )
    return AutoProcessor.from_pretrained(folder)


@dataclass(frozen=True)
class Reference:
    """What transformers answers for one image and question."""

    prompt: str  # the chat template's text, before the processor expands `<image>`
    input_ids: torch.Tensor  # (1, L)
    # As the processor made it: Idefics3/SmolVLM (1, tiles, 3, H, W), tiles row by row and the global image
    # last; LLaVA (1, 3, H, W).
    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor | None  # Idefics3/SmolVLM (1, tiles, H, W); None for LLaVA
    logits: torch.Tensor  # (1, L, V) float32
    new_ids: torch.Tensor  # (1, <= max_new_tokens) greedy tokens after the prompt
    text: str  # new_ids decoded with skip_special_tokens=True


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.no_grad()
def reference(folder: Path | str, image: Image.Image, question: str, max_new_tokens: int = 8) -> Reference:
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    prompt = processor.apply_chat_template(messages(question), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    logits = model(**inputs).logits.float()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new_ids = out[:, inputs["input_ids"].shape[1] :]
    return Reference(
        prompt=prompt,
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        pixel_attention_mask=inputs.get("pixel_attention_mask"),
        logits=logits,
        new_ids=new_ids,
        text=processor.tokenizer.decode(new_ids[0], skip_special_tokens=True),
    )


def test_image(width: int, height: int, seed: int) -> Image.Image:
    """Uniform noise under a few random filled shapes: detail at every scale, so every resize matters."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(rng.integers(0, 256, 3).tolist())
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


test_image.__test__ = False  # a helper, not a pytest test
