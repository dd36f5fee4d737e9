"""nanoVLM checkpoints (huggingface/nanoVLM's own format) read into vlm's modules: a key map, no nanoVLM code.

nanoVLM is SigLIP + pixel shuffle + SmolLM2, each written from scratch with its own parameter names. A folder
saved by its `VisionLanguageModel.save_pretrained` holds `config.json` (`dataclasses.asdict(VLMConfig)`) and
`model.safetensors` (`safetensors.torch.save_model(self)`). `read_nanovlm` maps that into the tensors and
configs of this library's own pieces: the SigLIP tower (`vlm.siglip`), the pixel-shuffle `Projector`
(`vlm.projector`) and a transformers `LlamaForCausalLM` (`write_lm` writes it once as its own folder, with
nanoVLM's tokenizer, as `vlm.lm` does for every VLM checkpoint), and says how its version of nanoVLM made pixels
and prompts (`ImageProcessing`, an image layout). Nothing is guessed: every tensor of the file is used exactly
once, or one `CheckpointError` lists what is missing, unexpected or of the wrong shape; a version whose prompts
vlm cannot write is refused with the reason.

Source read (github.com/huggingface/nanoVLM, file @ commit):
- models/vision_transformer.py @ a7fb36cc: `ViT`, a SigLIP ViT with a fused `attn.qkv_proj` whose output is
  split q | k | v (`qkv.split(C, dim=2)`), `ln1`/`ln2` pre-LN blocks, GELU(tanh), a final `layer_norm` over
  every token, position embeddings as one (1, N, D) Parameter, no pooling head. With `vit_cls_flag` it
  prepends a CLS token and returns `layer_norm(x[:, 0])` only.
- models/language_model.py @ 164ac2ca (same layers @ 052d4c0b): Llama: `RMSNorm`, rotate-half RoPE with
  `inv_freq = 1 / lm_re_base ** (arange(0, head_dim, 2) / head_dim)` (a persistent buffer, so it is in the
  file), GQA by `repeat_interleave`, SiLU-gated MLP, no biases, `head` tied to `token_embedding` when
  `lm_tie_weights`. cos and sin are multiplied by `lm_attn_scaling`.
- models/modality_projector.py: not in the searched copy of huggingface/nanoVLM; quoted from upstream commit
  4e0c0961 and identical in forks (sbrzz/nanoVLM @ 18cc65c5): `pixel_shuffle` = view(B, h, w, D) ->
  reshape(B, h/f, f, w/f, f, D) -> permute(0, 1, 3, 2, 4, 5) -> (B, h/f * w/f, f*f*D), then
  `proj = Linear(D * f * f, lm_hidden_dim, bias=False)`.
- models/vision_language_model.py @ c13cfc64, 06c07d2e: save_pretrained / from_pretrained as above; these
  versions put the image embeddings before all text tokens (`torch.cat((image_embd, token_embd), dim=1)`);
  later ones replace `<|image|>` placeholder tokens (`_replace_img_tokens_with_embd`, mask of image_token_id).
- models/config.py @ 340fd5f2, 03ecd8c3 (and the field set of the first release): the config.json keys.
- data/processors.py @ fc71839a (`get_tokenizer`: `AutoTokenizer.from_pretrained(lm_tokenizer,
  extra_special_tokens=vlm_extra_tokens, chat_template=lm_chat_template)`; `get_image_string`;
  `get_image_processor`), data/custom_transforms.py (DynamicResize, SplitImage, GlobalAndSplitImages; upstream's
  is not in the searched index: read in the forks zhili-zh/nanoVLM @ d9c6f69e and wundari/nanoVLM_HF @
  c9e9486b), data/datasets.py @ a363608b (the image string goes before the first message's text).
- generate.py, each version's prompt: @ 3dde5b68 (first release) "Question: {q} Answer:" after the image
  embeddings; then `image_token * mp_image_token_length + prompt` in a chat template, the image squashed by
  `transforms.Resize((s, s))` (as copied in forks of the 450M era); then `image_token * tokens * tiles + prompt`
  with DynamicResize and SplitImage; latest, `get_image_string(tokenizer, [grid], tokens) + prompt`, the global
  tile dropped when the tokenizer has no global image token.

Versions, told apart by their config.json (nothing else records them):
- no `vlm_extra_tokens` (the first release): refused. Its prompt is the fixed "Question: {q} Answer:" with the
  image embeddings before all text tokens, no image token and no chat template; vlm writes images as tokens in
  chat-templated conversations, and a template made up for it would be a format the model never saw.
- an image token, no `max_img_size`: the image squashed to one tile (PIL bilinear), `image_layout` "plain".
- an image token and `max_img_size`, no tile tokens: nanoVLM's tiles (`ImageProcessing.tiling`), each written as
  a plain run of image tokens.
- tile tokens (and maybe a global image token): nanoVLM's tiles in its own layout (`ImagePrompt` "nanovlm").
In each, pixels are `ToTensor()`'s [0, 1] (mean 0, std 1), the image string sits directly before the question
(`part_joiner` ""), and the chat template is `lm_chat_template` when the config has one, else the tokenizer's.

What differs from our modules, and how it is carried over
- The fused qkv is split into q/k/v; the (1, N, D) position Parameter loses its batch axis.
- Their pixel shuffle orders a token's channels as ours does (block row i, block column j, feature d ->
  (i*f + j)*D + d), so `proj` becomes `linear_1` unchanged; tests/test_nanovlm.py proves it on random features.
- `lm_attn_scaling` s scales RoPE's cos and sin, which scales q and k by s (RoPE is linear): folded into
  q_proj and k_proj, exactly. 1.0 in every released config.
- Past `lm_max_position_embeddings` their RoPE divides its frequencies by (length / max); transformers'
  default RoPE does not. Same logits up to that length (8192 in the released configs), different beyond.
- nanoVLM feeds the ViT `ToTensor()` pixels in [0, 1], without SigLIP's (x - 0.5) / 0.5: `image_mean` 0 and
  `image_std` 1 here say so.
- nanoVLM's greedy decoding takes the argmax over every token; vlm never generates the image token (its
  placeholder), which a trained model does not predict either.
- `vit_cls_flag` (a CLS token, and only its output kept) has no counterpart in our tower: refused. So are extra
  tokens other than nanoVLM's image, global-image and `rXcY` tile tokens (a fork's own prompt format), and tile
  tokens under other names than nanoVLM's `<row_X_col_Y>` / `<|global_image|>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from vlm.checks import CheckpointError, config_from_dict, positive_int
from vlm.conversation import NANOVLM_GLOBAL, NANOVLM_TILE, ImagePrompt
from vlm.processing import ImageProcessing
from vlm.projector import ProjectorConfig
from vlm.siglip import SiglipVisionConfig
from vlm.weights import check_fits, raise_problems, read_config, read_safetensors, safetensors_files

# ViT block: their name -> ours (under vision_encoder.blocks.{i}. / encoder.layers.{i}.), weight and bias each
_VIT_BLOCK = {"ln1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln2": "layer_norm2"}
_VIT_BLOCK |= {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# LM block: their name -> LlamaForCausalLM's (under decoder.blocks.{i}. / model.layers.{i}.), weights only
_LM_BLOCK = {
    "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj",
    "attn.out_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj", "norm1": "input_layernorm", "norm2": "post_attention_layernorm",
}  # fmt: skip
EMBEDDING, HEAD = "decoder.token_embedding.weight", "decoder.head.weight"
INV_FREQ = "decoder.rotary_embd.inv_freq"  # derived from lm_re_base: checked when present, never loaded


# Fields that count something: integers >= 1 (a 0 would divide by zero before any shape is compared)
_SIZES = (
    "vit_hidden_dim", "vit_inter_dim", "vit_patch_size", "vit_img_size", "vit_n_heads", "vit_n_blocks",
    "lm_hidden_dim", "lm_inter_dim", "lm_max_position_embeddings", "lm_vocab_size", "lm_n_heads",
    "lm_n_kv_heads", "lm_n_blocks", "mp_pixel_shuffle_factor",
)  # fmt: skip


@dataclass(frozen=True)
class NanoVLMConfig:
    """The `VLMConfig` fields a checkpoint's shapes and prompt depend on, under nanoVLM's names (config.json is
    `asdict(VLMConfig)`, so every version writes all of its fields; the defaulted ones here are those some
    versions lack). Training-only and hub fields (vit_model_type, lm_max_length, ...) are ignored."""

    vit_hidden_dim: int
    vit_inter_dim: int
    vit_patch_size: int
    vit_img_size: int
    vit_n_heads: int
    vit_n_blocks: int
    vit_ln_eps: float
    lm_hidden_dim: int
    lm_inter_dim: int
    lm_rms_eps: float
    lm_re_base: float
    lm_max_position_embeddings: int
    lm_vocab_size: int
    lm_n_heads: int
    lm_n_kv_heads: int
    lm_n_blocks: int
    lm_tie_weights: bool
    lm_tokenizer: str
    mp_pixel_shuffle_factor: int
    vit_cls_flag: bool = False
    vit_dropout: float = 0.0
    lm_dropout: float = 0.0
    lm_attn_scaling: float = 1.0
    lm_eos_token_id: int | None = None  # the first releases only
    lm_chat_template: str | None = None  # absent in early versions: the tokenizer's own template then
    mp_image_token_length: int | None = None  # absent in the first release (derived from the sizes)
    max_img_size: int | None = None  # present once images are split into tiles
    resize_to_max_side_len: bool = False
    vlm_extra_tokens: dict[str, str] | None = None  # tokens added to the tokenizer, in this order

    def __post_init__(self) -> None:
        for name in _SIZES:
            positive_int(getattr(self, name), name)
        if self.vit_cls_flag:
            raise ValueError(
                "vit_cls_flag is true: this nanoVLM ViT prepends a CLS token and keeps only its output "
                "(layer_norm(x[:, 0])), which vlm's SigLIP tower (no CLS token, every patch kept) cannot represent"
            )
        tokens = self.vlm_extra_tokens
        if tokens is not None and (
            not isinstance(tokens, dict) or not all(isinstance(v, str) for v in tokens.values())
        ):
            raise ValueError(f"vlm_extra_tokens must map names to token strings, got {tokens!r}")
        if tokens is not None and "image_token" not in tokens:
            raise ValueError("vlm_extra_tokens has no image_token")
        if self.lm_n_heads % self.lm_n_kv_heads:
            raise ValueError(
                f"lm_n_heads {self.lm_n_heads} is not a multiple of lm_n_kv_heads {self.lm_n_kv_heads}"
            )
        if self.lm_hidden_dim % self.lm_n_heads:
            raise ValueError(
                f"lm_hidden_dim {self.lm_hidden_dim} is not divisible by lm_n_heads {self.lm_n_heads}"
            )
        grid, f = self.vit_img_size // self.vit_patch_size, self.mp_pixel_shuffle_factor
        if grid % f:
            raise ValueError(f"mp_pixel_shuffle_factor {f} does not divide the {grid}x{grid} patch grid")
        if self.mp_image_token_length not in (None, (grid // f) ** 2):
            raise ValueError(
                f"mp_image_token_length {self.mp_image_token_length} is not the {(grid // f) ** 2} tokens a "
                f"{grid}x{grid} patch grid gives with mp_pixel_shuffle_factor {f}"
            )


def is_nanovlm(config: dict[str, Any]) -> bool:
    """Is this config.json nanoVLM's (`asdict(VLMConfig)`)? Its fields are prefixed vit_/lm_/mp_ and it has no
    `model_type`, which every transformers config (and none of nanoVLM's) carries."""
    return (
        isinstance(config, dict)
        and "model_type" not in config
        and all(key in config for key in ("vit_hidden_dim", "lm_hidden_dim", "mp_pixel_shuffle_factor"))
    )


def is_nanovlm_folder(folder: Path) -> bool:
    """Does `folder` hold a nanoVLM checkpoint (its config.json is nanoVLM's)?"""
    return (folder / "config.json").is_file() and is_nanovlm(read_config(folder))


@dataclass(frozen=True)
class NanoVLMCheckpoint:
    """A nanoVLM checkpoint in this library's terms: configs and state dicts under our modules' key names.

    - `vision` / `vision_state`: `SiglipVisionEncoder(vision).load_state_dict(vision_state)`.
    - `projector` / `projector_state`: `Projector(projector)`, pixel shuffle, one Linear without bias.
    - `text_config` / `lm_state`: `LlamaForCausalLM(LlamaConfig(**text_config))`; with tied embeddings
      `lm_state` holds `model.embed_tokens.weight` only (lm_head is that tensor).
    - The tokenizer: `tokenizer_source` with `extra_tokens` added as special tokens in this order (transformers
      gives them the ids after the base vocabulary) and `chat_template` when there is one (`load_tokenizer`).
    - Pixels and prompts, as this checkpoint's version of nanoVLM makes them (the module docstring):
      `image_processing`, and `prompt` (`image_token` x `tokens_per_image` per tile, in `image_layout`, the
      image string joined to the question by `part_joiner`).
    """

    vision: SiglipVisionConfig
    vision_state: dict[str, torch.Tensor]
    projector: ProjectorConfig
    projector_state: dict[str, torch.Tensor]
    text_config: dict[str, Any]
    lm_state: dict[str, torch.Tensor]
    tokenizer_source: str
    extra_tokens: dict[str, str]
    chat_template: str | None
    image_token: str
    tokens_per_image: int  # per tile, after pixel shuffle
    image_processing: ImageProcessing
    image_layout: Literal["plain", "nanovlm"]
    part_joiner: str = ""  # `image_string + prompt`
    vision_feature_layer: int = -1  # the tower's output, after its final layer norm
    typed_parts: bool = False  # their chat template is a text one: parts are joined (`part_joiner`)

    @property
    def prompt(self) -> ImagePrompt:
        return ImagePrompt(
            self.image_token, self.tokens_per_image, self.image_layout, joiner=self.part_joiner,
            global_image=self.image_processing.global_image,
        )  # fmt: skip


def read_nanovlm(folder: str | Path) -> NanoVLMCheckpoint:
    """Read a nanoVLM folder (config.json + model.safetensors) into a `NanoVLMCheckpoint`. Pickle-only folders
    are refused (nanoVLM's first weights were a `.pth`), and so are versions whose prompts vlm cannot write (the
    module docstring); a config or tensor set that does not fit raises one `CheckpointError` saying everything
    that is wrong."""
    folder = Path(folder)
    safetensors_files(folder)  # first: a pickle-only folder is told so, whatever its config says
    raw = read_config(folder)
    if not is_nanovlm(raw):
        raise CheckpointError(
            f"{folder}/config.json is not a nanoVLM config (vit_hidden_dim, lm_hidden_dim, "
            "mp_pixel_shuffle_factor and no model_type)"
        )
    try:
        c = config_from_dict(NanoVLMConfig, raw, "nanoVLM config.json")
    except (TypeError, ValueError) as err:  # CheckpointError is a ValueError: keep its text, add the folder
        raise CheckpointError(f"{folder}: {err}") from None
    processing, layout = _image_scheme(c, folder)
    grid = c.vit_img_size // c.vit_patch_size
    f = c.mp_pixel_shuffle_factor
    try:
        vision = SiglipVisionConfig(
            hidden_size=c.vit_hidden_dim, intermediate_size=c.vit_inter_dim, num_hidden_layers=c.vit_n_blocks,
            num_attention_heads=c.vit_n_heads, num_channels=3, image_size=c.vit_img_size,
            patch_size=c.vit_patch_size, hidden_act="gelu_pytorch_tanh",  # their ViTMLP: nn.GELU(approximate="tanh")
            layer_norm_eps=c.vit_ln_eps, attention_dropout=c.vit_dropout, vision_use_head=False,
        )  # fmt: skip
        projector = ProjectorConfig(
            vision_hidden_size=c.vit_hidden_dim, text_hidden_size=c.lm_hidden_dim, kind="pixel_shuffle",
            scale_factor=f, bias=False,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}/config.json: {err}") from None
    state = read_safetensors(folder)
    _check(c, state, folder)
    vision_state = _vision_state(c, state)
    projector_state = {"linear_1.weight": state.pop("MP.proj.weight")}  # same channel order (docstring)
    lm_state = _lm_state(c, state)
    assert not state, f"nanoVLM key map left tensors unread: {sorted(state)}"  # _check promised this
    tokens = dict(c.vlm_extra_tokens or {})
    return NanoVLMCheckpoint(
        vision=vision,
        vision_state=vision_state,
        projector=projector,
        projector_state=projector_state,
        text_config=_text_config(c, lm_state["model.embed_tokens.weight"].dtype),
        lm_state=lm_state,
        tokenizer_source=c.lm_tokenizer,
        extra_tokens=tokens,
        chat_template=c.lm_chat_template,
        image_token=tokens["image_token"],
        tokens_per_image=(grid // f) ** 2,
        image_processing=processing,
        image_layout=layout,
    )


_TILE_KEY = re.compile(r"r\d+c\d+")  # nanoVLM's tile token names: r1c1 .. r8c8


def _image_scheme(c: NanoVLMConfig, folder: Path) -> tuple[ImageProcessing, Literal["plain", "nanovlm"]]:
    """How this checkpoint's version of nanoVLM makes pixels and writes images (module docstring), or a
    `CheckpointError` saying why vlm cannot do as it does."""
    tokens = c.vlm_extra_tokens
    if not tokens:
        raise CheckpointError(
            f"{folder} is a checkpoint of nanoVLM's first release (its config.json has no vlm_extra_tokens): it "
            "reads the image embeddings before all text tokens and then the fixed prompt 'Question: ... Answer:', "
            "with no image token and no chat template. vlm writes images as tokens inside chat-templated "
            "conversations, and a template made up to imitate that prompt would be a conversation format this "
            "model never saw; it is not read. Later nanoVLM checkpoints (with an image token) are."
        )
    tiles = {key for key in tokens if _TILE_KEY.fullmatch(key)}
    if other := sorted(set(tokens) - tiles - {"image_token", "global_image_token"}):
        raise CheckpointError(
            f"{folder}: vlm_extra_tokens has tokens nanoVLM's prompts do not use ({', '.join(other)}): a fork's "
            "own prompt format, which vlm cannot write"
        )
    unit = {"image_mean": (0.0, 0.0, 0.0), "image_std": (1.0, 1.0, 1.0)}  # ToTensor(): [0, 1], not normalised
    has_global = "global_image_token" in tokens
    if c.max_img_size is None:
        if tiles or has_global:
            raise CheckpointError(
                f"{folder}: vlm_extra_tokens has tile or global-image tokens but the config has no max_img_size "
                "(the size nanoVLM cuts tiles from); no nanoVLM version reads images so"
            )
        # get_image_processor(vit_img_size): transforms.Resize((s, s)) on the PIL image (bilinear), ToTensor()
        return ImageProcessing(Image.Resampling.BILINEAR, **unit), "plain"
    if c.max_img_size % c.vit_img_size:
        raise CheckpointError(
            f"{folder}: max_img_size {c.max_img_size} is not a whole number of {c.vit_img_size}-px tiles "
            "(nanoVLM's SplitImage would fail on large images)"
        )
    # DynamicResize (bicubic, its default), ToTensor(), then the tiles, after the global one when there is one
    processing = ImageProcessing(
        Image.Resampling.BICUBIC, **unit, longest_edge=c.max_img_size, image_splitting=True, tiling="nanovlm",
        global_image=has_global, resize_to_longest_edge=c.resize_to_max_side_len,
    )  # fmt: skip
    if not tiles:
        if has_global:
            raise CheckpointError(
                f"{folder}: vlm_extra_tokens has a global image token but no tile tokens; nanoVLM's "
                "get_image_string writes both"
            )
        return processing, "plain"  # generate.py before get_image_string: image_token * tokens * tiles
    side = c.max_img_size // c.vit_img_size
    wanted = {
        f"r{r}c{col}": NANOVLM_TILE.format(row=r, col=col)
        for r in range(1, side + 1)
        for col in range(1, side + 1)
    }
    if has_global:
        wanted["global_image_token"] = NANOVLM_GLOBAL
    if wrong := [
        f"{key} {tokens.get(key)!r} (wanted {value!r})"
        for key, value in wanted.items()
        if tokens.get(key) != value
    ]:
        raise CheckpointError(
            f"{folder}: vlm writes nanoVLM's tile tokens as {NANOVLM_TILE} and {NANOVLM_GLOBAL}, for grids up to "
            f"{side}x{side} (max_img_size / vit_img_size); this checkpoint's differ: " + ", ".join(wrong[:8])
        )
    return processing, "nanovlm"


def expected_shapes(c: NanoVLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor nanoVLM's save_pretrained writes for config `c`, with its shape (the tied head aside:
    `_check` handles decoder.head / decoder.token_embedding)."""
    d, inter, p = c.vit_hidden_dim, c.vit_inter_dim, c.vit_patch_size
    patches = (c.vit_img_size // p) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "vision_encoder.patch_embedding.conv.weight": (d, 3, p, p),
        "vision_encoder.patch_embedding.conv.bias": (d,),
        "vision_encoder.patch_embedding.position_embedding": (1, patches, d),
        "vision_encoder.layer_norm.weight": (d,),
        "vision_encoder.layer_norm.bias": (d,),
        "MP.proj.weight": (c.lm_hidden_dim, d * c.mp_pixel_shuffle_factor**2),
    }
    vit_block = {"ln1": (d,), "attn.qkv_proj": (3 * d, d), "attn.out_proj": (d, d), "ln2": (d,)}
    vit_block |= {"mlp.fc1": (inter, d), "mlp.fc2": (d, inter)}
    for i in range(c.vit_n_blocks):
        for name, shape in vit_block.items():
            shapes[f"vision_encoder.blocks.{i}.{name}.weight"] = shape
            shapes[f"vision_encoder.blocks.{i}.{name}.bias"] = shape[:1]
    h, lm_inter, head_dim = c.lm_hidden_dim, c.lm_inter_dim, c.lm_hidden_dim // c.lm_n_heads
    kv = c.lm_n_kv_heads * head_dim
    lm_block = {
        "attn.q_proj": (h, h),
        "attn.k_proj": (kv, h),
        "attn.v_proj": (kv, h),
        "attn.out_proj": (h, h),
    }
    lm_block |= {"mlp.gate_proj": (lm_inter, h), "mlp.up_proj": (lm_inter, h), "mlp.down_proj": (h, lm_inter)}
    lm_block |= {"norm1": (h,), "norm2": (h,)}
    for i in range(c.lm_n_blocks):
        for name, shape in lm_block.items():
            shapes[f"decoder.blocks.{i}.{name}.weight"] = shape
    shapes["decoder.norm.weight"] = (h,)
    shapes[EMBEDDING] = shapes[HEAD] = (c.lm_vocab_size, h)
    shapes[INV_FREQ] = (head_dim // 2,)
    return shapes


def _check(c: NanoVLMConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """One `CheckpointError` with every missing, unexpected and misshapen tensor (vlm.weights.load_strict's
    wording), so that the key map below can take each tensor exactly once."""
    shapes = expected_shapes(c)
    optional = {INV_FREQ}  # a buffer derived from lm_re_base: nothing is lost without it
    if c.lm_tie_weights:
        # One tensor under two names; safetensors' save_model keeps the sorted-first, decoder.head.weight
        # (safetensors.torch._remove_duplicate_names). Either name is read; both must then be equal.
        optional |= {EMBEDDING, HEAD}
    missing = sorted(shapes.keys() - state.keys() - optional)
    if c.lm_tie_weights and EMBEDDING not in state and HEAD not in state:
        missing.append(f"{HEAD} (or {EMBEDDING}: tied)")
    unexpected = sorted(state.keys() - shapes.keys())
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)} vs {tuple(shapes[key])} from config.json"
        for key in shapes.keys() & state.keys()
        if tuple(state[key].shape) != shapes[key]
    )
    problems = [
        (title, items)
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    ]  # the tied-pair and RoPE checks below only mean something once the keys fit
    tied_pair = c.lm_tie_weights and EMBEDDING in state and HEAD in state
    if not problems and tied_pair and not torch.equal(state[EMBEDDING], state[HEAD]):
        problems.append(("tied but different", [f"{EMBEDDING} and {HEAD} (lm_tie_weights is true)"]))
    if not problems and INV_FREQ in state:
        stored = state[INV_FREQ]
        head_dim = c.lm_hidden_dim // c.lm_n_heads
        wanted = 1.0 / (c.lm_re_base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        if not torch.allclose(stored.float(), wanted.to(stored.dtype).float(), rtol=1e-5, atol=0.0):
            problems.append(("rope", [f"{INV_FREQ} is not the RoPE of lm_re_base {c.lm_re_base}"]))
    raise_problems(f"{folder} (nanoVLM) does not fit its config.json:", problems)


def _vision_state(c: NanoVLMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their ViT (vision_encoder.*) -> our SiglipVisionEncoder's keys; each tensor is popped from `state`."""
    theirs = "vision_encoder."
    out = {
        "embeddings.patch_embedding.weight": state.pop(f"{theirs}patch_embedding.conv.weight"),
        "embeddings.patch_embedding.bias": state.pop(f"{theirs}patch_embedding.conv.bias"),
        # (1, N, D) Parameter added to the patches -> our nn.Embedding's (N, D) table
        "embeddings.position_embedding.weight": state.pop(f"{theirs}patch_embedding.position_embedding")[0],
        "post_layernorm.weight": state.pop(f"{theirs}layer_norm.weight"),
        "post_layernorm.bias": state.pop(f"{theirs}layer_norm.bias"),
    }
    for i in range(c.vit_n_blocks):
        block, layer = f"{theirs}blocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            # Rows q | k | v: their forward splits the output as `q, k, v = qkv.split(C, dim=2)`. Cloned so
            # the three do not share one storage (safetensors refuses to save shared tensors).
            q, k, v = state.pop(f"{block}attn.qkv_proj.{kind}").chunk(3)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{layer}self_attn.{name}.{kind}"] = part.clone()
            for their_name, our_name in _VIT_BLOCK.items():
                out[f"{layer}{our_name}.{kind}"] = state.pop(f"{block}{their_name}.{kind}")
    return out


def _lm_state(c: NanoVLMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their LanguageModel (decoder.*) -> LlamaForCausalLM's keys; each tensor is popped from `state`."""
    state.pop(INV_FREQ, None)  # checked in _check; transformers computes its own from rope_theta
    if c.lm_tie_weights:
        embedding = state.pop(HEAD) if HEAD in state else state.pop(EMBEDDING)
        state.pop(EMBEDDING, None)  # both names present: checked equal in _check
        out = {"model.embed_tokens.weight": embedding}
    else:
        out = {"model.embed_tokens.weight": state.pop(EMBEDDING), "lm_head.weight": state.pop(HEAD)}
    out["model.norm.weight"] = state.pop("decoder.norm.weight")
    for i in range(c.lm_n_blocks):
        block, layer = f"decoder.blocks.{i}.", f"model.layers.{i}."
        for their_name, our_name in _LM_BLOCK.items():
            out[f"{layer}{our_name}.weight"] = state.pop(f"{block}{their_name}.weight")
        if (
            c.lm_attn_scaling != 1.0
        ):  # their cos, sin * s == rope(s q), rope(s k): fold s into the projections
            for name in ("q_proj", "k_proj"):
                key = f"{layer}self_attn.{name}.weight"
                out[key] = out[key] * c.lm_attn_scaling
    return out


def _text_config(c: NanoVLMConfig, dtype: torch.dtype) -> dict[str, Any]:
    """transformers `LlamaConfig` keys for their LanguageModel, every field that changes the numbers set."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.lm_vocab_size,
        "hidden_size": c.lm_hidden_dim,
        "intermediate_size": c.lm_inter_dim,
        "num_hidden_layers": c.lm_n_blocks,
        "num_attention_heads": c.lm_n_heads,
        "num_key_value_heads": c.lm_n_kv_heads,
        "head_dim": c.lm_hidden_dim // c.lm_n_heads,
        "hidden_act": "silu",  # their LanguageModelMLP: F.silu(gate_proj(x)) * up_proj(x)
        "max_position_embeddings": c.lm_max_position_embeddings,
        "rms_norm_eps": c.lm_rms_eps,
        "rope_theta": float(c.lm_re_base),  # transformers 4 reads this; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": float(c.lm_re_base)},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": c.lm_dropout,
        "tie_word_embeddings": c.lm_tie_weights,
        "initializer_range": 0.02,  # their _init_weights
        "pretraining_tp": 1,
        "use_cache": True,
        # nanoVLM keeps token ids with its tokenizer (lm_tokenizer); only the first release wrote an eos id
        "bos_token_id": None,
        "eos_token_id": c.lm_eos_token_id,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }


# -- the LM, as a standalone transformers folder -----------------------------------------------------------


def load_tokenizer(checkpoint: NanoVLMCheckpoint, folder: Path) -> Any:
    """nanoVLM's tokenizer, built as data/processors.py `get_tokenizer` builds it: `lm_tokenizer` (a hub id or a
    folder) with `vlm_extra_tokens` as named special tokens, in their order, and `lm_chat_template` when the
    config has one. Every token must have a row in the checkpoint's embedding."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"extra_special_tokens": dict(checkpoint.extra_tokens)}
    if checkpoint.chat_template is not None:
        kwargs["chat_template"] = checkpoint.chat_template
    source = checkpoint.tokenizer_source
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, trust_remote_code=False, **kwargs)
    except Exception as err:
        raise CheckpointError(
            f"{folder}: its tokenizer (lm_tokenizer {source!r}) cannot be loaded: {err}"
        ) from err
    rows = checkpoint.text_config["vocab_size"]
    if len(tokenizer) > rows:
        raise CheckpointError(
            f"{folder}: its tokenizer ({source} with {len(checkpoint.extra_tokens)} extra tokens) has "
            f"{len(tokenizer)} tokens, more than the {rows} rows of the checkpoint's embedding (lm_vocab_size): not "
            "the tokenizer it was trained with"
        )
    return tokenizer


def write_lm(folder: Path, out: Path) -> None:
    """Write the checkpoint's LM to `out` as a transformers `LlamaForCausalLM` folder (config.json,
    model.safetensors) with nanoVLM's tokenizer (`load_tokenizer`); `vlm.lm` does this once per checkpoint."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    checkpoint = read_nanovlm(folder)
    tokenizer = load_tokenizer(checkpoint, folder)
    config = LlamaConfig(**checkpoint.text_config)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    # the key map against the installed transformers' Llama
    check_fits(expected, checkpoint.lm_state, f"the LM of {folder} (transformers' LlamaForCausalLM)")
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in checkpoint.lm_state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
