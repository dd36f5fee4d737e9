"""nanoVLM checkpoints (vlm/nanovlm.py): synthetic checkpoints written in nanoVLM's layout, one per version vlm
reads, and nanoVLM's own pipeline re-implemented here from its source — tokenizer, pixels, prompt, forward pass and
greedy decoding — as the reference `VisionLanguageModel.from_pretrained(<nanoVLM folder>)` must reproduce.

The reference functions below follow github.com/huggingface/nanoVLM line by line (no nanoVLM code is
installed or imported): models/vision_transformer.py @ a7fb36cc (ViT), models/modality_projector.py @ 4e0c0961
as copied unchanged in sbrzz/nanoVLM @ 18cc65c5 (ModalityProjector), models/language_model.py @ 164ac2ca
(LanguageModel), models/vision_language_model.py @ c13cfc64 (`_replace_img_tokens_with_embd`, greedy `generate`
and its EOS post-processing), data/processors.py @ fc71839a (get_tokenizer, get_image_string),
data/custom_transforms.py (DynamicResize, GlobalAndSplitImages; read in zhili-zh/nanoVLM @ d9c6f69e and
wundari/nanoVLM_HF @ c9e9486b), and each version's generate.py prompt (see vlm/nanovlm.py). torchvision is not
installed: its PIL resize is `PIL.Image.resize(size, filter)` and its tensor resize `F.interpolate(...,
antialias=True)`, which is what it calls. The file is written as their save_pretrained does: config.json =
asdict(VLMConfig) (the fields of models/config.py @ 340fd5f2) and `safetensors.torch.save_model(model)` on a
module with their parameter names (a tied head shared, so save_model drops one name as it does for theirs).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_vlms import test_image
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vlm.checks import CheckpointError
from vlm.conversation import ImagePrompt, user
from vlm.model import VisionLanguageModel, VLMConfig
from vlm.nanovlm import is_nanovlm, read_nanovlm
from vlm.processing import ImageProcessing, SiglipImageProcessor
from vlm.projector import Projector, pixel_shuffle
from vlm.siglip import SiglipVisionEncoder
from vlm.weights import load_strict

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TILE_TOKENS = {
    f"r{r}c{c}": f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)
}  # max_img_size / tile
EXTRA_TOKENS = {"image_token": "<|image|>", "global_image_token": "<|global_image|>", **TILE_TOKENS}
BASE_VOCAB = 120
IMAGE_TOKEN_ID = BASE_VOCAB  # the first extra token: transformers appends them after the base vocabulary
SMOLLM2_VOCAB = (
    49152  # SmolLM2's tokenizer, which the end-to-end checkpoints use (their lm_tokenizer's family)
)
QUESTION = "What is in the picture?"


def their_config(**overrides: object) -> dict:
    """asdict(VLMConfig) of models/config.py @ 340fd5f2, shrunk: a 16x16 image of 4x4 patches (a 4x4 grid),
    pixel shuffle 2 (4 image tokens), tiles of 16 px from images of up to 64 px, a 2-block GQA LM (6 heads, 2 kv
    heads)."""
    config = {
        "vit_hidden_dim": 32, "vit_inter_dim": 64, "vit_patch_size": 4, "vit_img_size": 16, "vit_n_heads": 4,
        "vit_dropout": 0.0, "vit_n_blocks": 2, "vit_ln_eps": 1e-6, "vit_cls_flag": False,
        "vit_model_type": "google/siglip2-base-patch16-512",
        "lm_hidden_dim": 48, "lm_inter_dim": 96, "lm_rms_eps": 1e-5, "lm_re_base": 100000,
        "lm_max_position_embeddings": 8192, "lm_base_vocab_size": BASE_VOCAB,
        "extra_token_amount": len(EXTRA_TOKENS), "lm_vocab_size": BASE_VOCAB + len(EXTRA_TOKENS),
        "lm_n_heads": 6, "lm_n_kv_heads": 2, "lm_dropout": 0.0, "lm_n_blocks": 2, "lm_attn_scaling": 1.0,
        "lm_max_length": 4096, "lm_use_tokens": False, "lm_tie_weights": True,
        "lm_model_type": "HuggingFaceTB/SmolLM2-360M-Instruct", "lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct",
        "lm_chat_template": CHAT_TEMPLATE, "mp_pixel_shuffle_factor": 2, "mp_image_token_length": 4,
        "max_img_size": 64, "resize_to_max_side_len": False, "vlm_extra_tokens": dict(EXTRA_TOKENS),
        "vlm_load_backbone_weights": True, "vlm_checkpoint_path": "checkpoints", "hf_repo_name": "nanoVLM",
    }  # fmt: skip
    return config | overrides


def their_state(c: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under nanoVLM's state_dict names and shapes (read off their module definitions); with
    lm_tie_weights the head and the token embedding are one tensor, as `self.head.weight = ...` makes them."""
    g = torch.Generator().manual_seed(seed)
    d, inter, p, n = c["vit_hidden_dim"], c["vit_inter_dim"], c["vit_patch_size"], c["vit_img_size"]
    h, lm_inter, vocab = c["lm_hidden_dim"], c["lm_inter_dim"], c["lm_vocab_size"]
    head_dim = h // c["lm_n_heads"]
    kv = c["lm_n_kv_heads"] * head_dim
    shapes = {
        "vision_encoder.patch_embedding.conv.weight": (d, 3, p, p),
        "vision_encoder.patch_embedding.conv.bias": (d,),
        "vision_encoder.patch_embedding.position_embedding": (1, (n // p) ** 2, d),
        "vision_encoder.layer_norm.weight": (d,),
        "vision_encoder.layer_norm.bias": (d,),
        "MP.proj.weight": (h, d * c["mp_pixel_shuffle_factor"] ** 2),
        "decoder.token_embedding.weight": (vocab, h),
        "decoder.norm.weight": (h,),
    }
    for i in range(c["vit_n_blocks"]):
        b = f"vision_encoder.blocks.{i}."
        for name, shape in (("ln1", (d,)), ("attn.qkv_proj", (3 * d, d)), ("attn.out_proj", (d, d)),
                            ("ln2", (d,)), ("mlp.fc1", (inter, d)), ("mlp.fc2", (d, inter))):  # fmt: skip
            shapes[f"{b}{name}.weight"], shapes[f"{b}{name}.bias"] = shape, shape[:1]
    for i in range(c["lm_n_blocks"]):
        b = f"decoder.blocks.{i}."
        for name, shape in (("attn.q_proj", (h, h)), ("attn.k_proj", (kv, h)), ("attn.v_proj", (kv, h)),
                            ("attn.out_proj", (h, h)), ("mlp.gate_proj", (lm_inter, h)), ("mlp.up_proj", (lm_inter, h)),
                            ("mlp.down_proj", (h, lm_inter)), ("norm1", (h,)), ("norm2", (h,))):  # fmt: skip
            shapes[f"{b}{name}.weight"] = shape
    state = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=g)
        is_norm = len(shape) == 1 and key.endswith("weight")  # LayerNorm / RMSNorm gains: around 1
        state[key] = 1 + 0.1 * x if is_norm else 0.1 * x
    state["decoder.head.weight"] = (
        state["decoder.token_embedding.weight"]
        if c["lm_tie_weights"]
        else 0.1 * torch.randn((vocab, h), generator=g)
    )
    # RotaryEmbedding registers inv_freq as a (persistent) buffer: it is in their state_dict
    state["decoder.rotary_embd.inv_freq"] = 1.0 / (
        c["lm_re_base"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    )
    return state


def write_checkpoint(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """What VisionLanguageModel.save_pretrained writes: config.json, and save_model(model) on a module holding
    `state` under its names (one Parameter where two names hold the same tensor, as their tied head does)."""
    root, parameters = nn.Module(), {}
    for key, value in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if name == "inv_freq":
            module.register_buffer(name, value)
        else:
            module.register_parameter(name, parameters.setdefault(id(value), nn.Parameter(value)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    save_model(root, str(folder / "model.safetensors"))
    return folder


# -- nanoVLM's forward passes, re-implemented from their source ----------------------------------------------


def their_vit(s: dict, c: dict, x: torch.Tensor) -> torch.Tensor:
    """models/vision_transformer.py @ a7fb36cc, ViT.forward with vit_cls_flag False (eval: no dropout)."""
    d, heads = c["vit_hidden_dim"], c["vit_n_heads"]
    ln = lambda x, p: F.layer_norm(x, (d,), s[f"{p}.weight"], s[f"{p}.bias"], c["vit_ln_eps"])  # noqa: E731
    lin = lambda x, p: F.linear(x, s[f"{p}.weight"], s[f"{p}.bias"])  # noqa: E731
    v = "vision_encoder."
    x = F.conv2d(
        x,
        s[f"{v}patch_embedding.conv.weight"],
        s[f"{v}patch_embedding.conv.bias"],
        stride=c["vit_patch_size"],
    )
    x = x.flatten(2).transpose(1, 2) + s[f"{v}patch_embedding.position_embedding"]
    B, T, C = x.shape
    for i in range(c["vit_n_blocks"]):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, f"{b}ln1"), f"{b}attn.qkv_proj").split(C, dim=2)
        q, k, val = (t.view(B, T, heads, C // heads).transpose(1, 2) for t in (q, k, val))
        y = F.scaled_dot_product_attention(q, k, val, is_causal=False)
        x = x + lin(y.transpose(1, 2).contiguous().view(B, T, C), f"{b}attn.out_proj")
        x = x + lin(F.gelu(lin(ln(x, f"{b}ln2"), f"{b}mlp.fc1"), approximate="tanh"), f"{b}mlp.fc2")
    return ln(x, f"{v}layer_norm")


def their_pixel_shuffle(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """ModalityProjector.pixel_shuffle (models/modality_projector.py)."""
    bsz, seq, embed_dim = x.size()
    seq_root = int(seq**0.5)
    height = width = seq_root
    x = x.view(bsz, height, width, embed_dim)
    h_out, w_out = height // scale_factor, width // scale_factor
    x = x.reshape(bsz, h_out, scale_factor, w_out, scale_factor, embed_dim)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous()
    return x.reshape(bsz, h_out * w_out, embed_dim * scale_factor**2)


def their_mp(s: dict, c: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(their_pixel_shuffle(x, c["mp_pixel_shuffle_factor"]), s["MP.proj.weight"])  # bias=False


def their_lm(s: dict, c: dict, x: torch.Tensor, last: bool = False) -> torch.Tensor:
    """models/language_model.py @ 164ac2ca, LanguageModel.forward on embeddings from position 0 (prefill, no
    cache, no padding), then the VLM's `decoder.head`: logits (B, T, vocab); `last`: at the last position only,
    as `generate` applies the head (B, 1, vocab)."""
    h, heads, kv_heads, eps = c["lm_hidden_dim"], c["lm_n_heads"], c["lm_n_kv_heads"], c["lm_rms_eps"]
    head_dim = h // heads

    def rms(x: torch.Tensor, p: str) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + eps) * s[f"{p}.weight"]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    B, T, _ = x.shape
    position_ids = torch.arange(T).unsqueeze(0).expand(B, -1)
    freqs = position_ids.reshape(-1).float().unsqueeze(-1) * s["decoder.rotary_embd.inv_freq"].unsqueeze(0)
    emb = torch.cat([freqs.reshape(B, T, -1)] * 2, dim=-1)
    cos = (torch.cos(emb) * c["lm_attn_scaling"]).unsqueeze(1)  # (B, 1, T, head_dim)
    sin = (torch.sin(emb) * c["lm_attn_scaling"]).unsqueeze(1)
    for i in range(c["lm_n_blocks"]):
        b = f"decoder.blocks.{i}."
        a = rms(x, f"{b}norm1")
        q = F.linear(a, s[f"{b}attn.q_proj.weight"]).view(B, T, heads, head_dim).transpose(1, 2)
        k = F.linear(a, s[f"{b}attn.k_proj.weight"]).view(B, T, kv_heads, head_dim).transpose(1, 2)
        v = F.linear(a, s[f"{b}attn.v_proj.weight"]).view(B, T, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + F.linear(y.transpose(1, 2).contiguous().view(B, T, h), s[f"{b}attn.out_proj.weight"])
        m = rms(x, f"{b}norm2")
        gate = F.silu(F.linear(m, s[f"{b}mlp.gate_proj.weight"]))
        x = x + F.linear(gate * F.linear(m, s[f"{b}mlp.up_proj.weight"]), s[f"{b}mlp.down_proj.weight"])
    x = rms(x, "decoder.norm")
    return F.linear(x[:, -1:] if last else x, s["decoder.head.weight"])


def their_get_image_string(
    tokenizer: SimpleNamespace, splitted_image_counts: list, mp_image_token_length: int
) -> str:
    """data/processors.py @ fc71839a."""
    image_string = ""
    for idx, (n_h, n_w) in enumerate(splitted_image_counts):
        if len(splitted_image_counts) > 1:
            image_string += f"<image: {idx}>"
        if hasattr(tokenizer, "global_image_token"):
            image_string += tokenizer.global_image_token
            image_string += tokenizer.image_token * mp_image_token_length
            if n_h == 1 and n_w == 1:
                continue
        for i in range(n_h):
            for j in range(n_w):
                image_string += getattr(tokenizer, f"r{i + 1}c{j + 1}")
                image_string += tokenizer.image_token * mp_image_token_length
    return image_string


def their_tokenizer(c: dict):
    """data/processors.py @ fc71839a, get_tokenizer."""
    kwargs = {"use_fast": True}
    if c.get("vlm_extra_tokens") is not None:
        kwargs["extra_special_tokens"] = c["vlm_extra_tokens"]
    if c.get("lm_chat_template") is not None:
        kwargs["chat_template"] = c["lm_chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(c["lm_tokenizer"], **kwargs)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def their_new_hw(h: int, w: int, p: int, m: int, resize_to_max_side_len: bool) -> tuple[int, int]:
    """data/custom_transforms.py, DynamicResize._get_new_hw."""
    long, short = (w, h) if w >= h else (h, w)
    target_long = m if resize_to_max_side_len else min(m, math.ceil(long / p) * p)
    scale = target_long / long
    target_short = math.ceil(short * scale / p) * p
    target_short = max(target_short, p)
    return (target_short, target_long) if w >= h else (target_long, target_short)


def their_to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor on an RGB PIL image: uint8 (3, H, W), `.to(float32).div(255)`."""
    x = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return x.to(dtype=torch.float32).div(255)


def their_pixels(image: Image.Image, c: dict, tokenizer) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image processor each version's generate.py uses, and its tile grid. Without max_img_size:
    `Compose([Resize((s, s)), ToTensor()])` (torchvision's PIL resize, bilinear). With it: DynamicResize (bicubic)
    -> ToTensor -> GlobalAndSplitImages, then generate.py drops the global tile when the tokenizer has no global
    image token (older versions' SplitImage never made one)."""
    s = c["vit_img_size"]
    if c.get("max_img_size") is None:
        return their_to_tensor(image.resize((s, s), Image.Resampling.BILINEAR))[None], (1, 1)
    new_h, new_w = their_new_hw(image.height, image.width, s, c["max_img_size"], c["resize_to_max_side_len"])
    x = their_to_tensor(image.resize((new_w, new_h), Image.Resampling.BICUBIC))[None]  # (1, 3, H, W)
    b, ch, h, w = x.shape
    n_h, n_w = h // s, w // s
    # rearrange(x, "b c (nh ph) (nw pw) -> (b nh nw) c ph pw")
    patches = x.reshape(b, ch, n_h, s, n_w, s).permute(0, 2, 4, 1, 3, 5).reshape(b * n_h * n_w, ch, s, s)
    if (n_h, n_w) != (1, 1):
        global_patch = F.interpolate(x, size=[s, s], mode="bilinear", align_corners=False, antialias=True)
        patches = torch.cat([global_patch, patches], dim=0)
    if not hasattr(tokenizer, "global_image_token") and n_h * n_w == len(patches) - 1:
        patches = patches[1:]
    return patches, (n_h, n_w)


def their_prompt_ids(tokenizer, c: dict, grids: list[tuple[int, int]], question: str) -> list[int]:
    """generate.py's prompt: the image string directly before the question, one user turn, chat template. Before
    `get_image_string` existed (no tile tokens): `image_token * mp_image_token_length` per tile."""
    n = c["mp_image_token_length"]
    if hasattr(tokenizer, "r1c1"):
        image_string = their_get_image_string(tokenizer, grids, n)
    else:
        image_string = "".join(tokenizer.image_token * n * rows * cols for rows, cols in grids)
    messages = [{"role": "user", "content": image_string + question}]
    encoded = tokenizer.apply_chat_template([messages], tokenize=True, add_generation_prompt=True)
    return encoded["input_ids"][0]


def their_embeddings(s: dict, c: dict, tokenizer, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """vision_language_model.py: token embeddings with the image tokens replaced (`_replace_img_tokens_with_embd`)."""
    embeddings = F.embedding(ids, s["decoder.token_embedding.weight"]).clone()
    image_embd = their_mp(s, c, their_vit(s, c, pixels))
    embeddings[ids == tokenizer.image_token_id] = image_embd.view(-1, image_embd.size(-1))
    return embeddings


def their_greedy_text(s: dict, c: dict, tokenizer, ids: torch.Tensor, pixels: torch.Tensor, n: int) -> str:
    """VisionLanguageModel.generate(greedy=True): argmax over every token for `n` steps (the prefix recomputed
    each step: their no-cache path), every token after the first EOS replaced by EOS, then generate.py's
    `batch_decode(..., skip_special_tokens=True)`."""
    embeddings = their_embeddings(s, c, tokenizer, ids, pixels)
    new = []
    for _ in range(n):
        token = their_lm(s, c, embeddings, last=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        new.append(token)
        embeddings = torch.cat([embeddings, F.embedding(token, s["decoder.token_embedding.weight"])], dim=1)
    generated = torch.cat(new, dim=1)
    eos = generated == tokenizer.eos_token_id
    if eos.any():
        first = eos.int().argmax(dim=1).item()
        generated[:, first:] = tokenizer.eos_token_id
    return tokenizer.batch_decode(generated, skip_special_tokens=True)[0]


# -- tests ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    config = their_config()
    state = their_state(config)
    folder = write_checkpoint(tmp_path_factory.mktemp("nanovlm"), config, state)
    return config, state, read_nanovlm(folder)


def test_recognises_their_config_json() -> None:
    assert is_nanovlm(their_config())
    assert not is_nanovlm({"model_type": "llama", "hidden_size": 48})
    assert not is_nanovlm({"vision": {}, "projector": {}, "lm_source": "x"})  # our own VLM's config.json
    assert not is_nanovlm({**their_config(), "model_type": "idefics3"})


def test_a_tied_head_is_stored_once_under_its_sorted_first_name(tmp_path: Path) -> None:
    config = their_config()
    folder = write_checkpoint(tmp_path, config, their_state(config))
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert "decoder.head.weight" in keys and "decoder.token_embedding.weight" not in keys


def test_our_tower_equals_their_vit(saved) -> None:
    config, state, checkpoint = saved
    assert checkpoint.vision.vision_use_head is False and checkpoint.vision.hidden_act == "gelu_pytorch_tanh"
    tower = SiglipVisionEncoder(checkpoint.vision).eval()
    load_strict(tower, checkpoint.vision_state, "nanoVLM vision")
    pixels = torch.rand(2, 3, 16, 16)  # ToTensor() range: nanoVLM does not normalise
    with torch.no_grad():
        ours = tower(pixels).last_hidden_state
        theirs = their_vit(state, config, pixels)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("factor", [2, 4])
def test_their_pixel_shuffle_orders_channels_as_ours(factor: int) -> None:
    # So their projection's input columns need no permutation: MP.proj.weight is linear_1.weight as is.
    features = torch.randn(2, 64, 5)  # an 8x8 patch grid of 5 features
    assert torch.equal(their_pixel_shuffle(features, factor), pixel_shuffle(features, (8, 8), factor))


def test_our_projector_equals_their_modality_projector(saved) -> None:
    config, state, checkpoint = saved
    assert (checkpoint.projector.kind, checkpoint.projector.scale_factor, checkpoint.projector.bias) == (
        "pixel_shuffle", 2, False,
    )  # fmt: skip
    projector = Projector(checkpoint.projector)
    projector.load_state_dict(checkpoint.projector_state, strict=True)
    features = torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(projector(features), their_mp(state, config, features))


@pytest.mark.parametrize(("tied", "attn_scaling"), [(True, 1.0), (False, 1.5)])
def test_transformers_llama_equals_their_lm(tmp_path: Path, tied: bool, attn_scaling: float) -> None:
    config = their_config(lm_tie_weights=tied, lm_attn_scaling=attn_scaling)
    state = their_state(config, seed=1)
    checkpoint = read_nanovlm(write_checkpoint(tmp_path, config, state))
    lm = LlamaForCausalLM(LlamaConfig(**checkpoint.text_config)).eval()
    missing, unexpected = lm.load_state_dict(checkpoint.lm_state, strict=False)
    assert (missing, unexpected) == ((["lm_head.weight"] if tied else []), [])
    assert (lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()) == tied
    ids = torch.randint(0, config["lm_vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        theirs = their_lm(
            state,
            config,
            F.embedding(ids, state["decoder.head.weight" if tied else "decoder.token_embedding.weight"]),
        )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_the_whole_model_equals_theirs_on_an_image_question(saved) -> None:
    # vision_language_model.py (image-token versions): image embeddings replace the <|image|> positions.
    config, state, checkpoint = saved
    tower = SiglipVisionEncoder(checkpoint.vision).eval()
    tower.load_state_dict(checkpoint.vision_state)
    projector = Projector(checkpoint.projector)
    projector.load_state_dict(checkpoint.projector_state)
    lm = LlamaForCausalLM(LlamaConfig(**checkpoint.text_config)).eval()
    lm.load_state_dict(checkpoint.lm_state, strict=False)
    n = checkpoint.tokens_per_image
    ids = torch.tensor([[5, 7] + [IMAGE_TOKEN_ID] * n + [9, 11, 13]])
    pixels = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        theirs_embeds = F.embedding(ids, state["decoder.head.weight"]).clone()
        theirs_embeds[ids == IMAGE_TOKEN_ID] = their_mp(state, config, their_vit(state, config, pixels)).view(
            -1, 48
        )
        theirs = their_lm(state, config, theirs_embeds)
        embeds = lm.get_input_embeddings()(ids).clone()
        embeds[ids == IMAGE_TOKEN_ID] = projector(tower(pixels).last_hidden_state).view(-1, 48)
        ours = lm(inputs_embeds=embeds).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_the_prompt_is_written_as_theirs(saved) -> None:
    config, _, checkpoint = saved
    assert (checkpoint.tokenizer_source, checkpoint.image_token, checkpoint.tokens_per_image) == (
        config["lm_tokenizer"], "<|image|>", 4,
    )  # fmt: skip
    assert checkpoint.image_layout == "nanovlm" and checkpoint.chat_template == CHAT_TEMPLATE
    assert list(checkpoint.extra_tokens) == list(EXTRA_TOKENS)  # their order gives the token ids
    p = checkpoint.image_processing
    assert (p.tiling, p.longest_edge, p.global_image, p.resample) == (
        "nanovlm",
        64,
        True,
        Image.Resampling.BICUBIC,
    )
    assert (p.image_mean, p.image_std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    for tokens, prompt in (
        (EXTRA_TOKENS, checkpoint.prompt),
        (
            {"image_token": "<|image|>", **TILE_TOKENS},
            ImagePrompt("<|image|>", 4, "nanovlm", global_image=False),
        ),
    ):
        tokenizer = SimpleNamespace(**tokens)
        for grids in ([(1, 1)], [(2, 2)], [(1, 2), (2, 1)], [(3, 4), (1, 1), (4, 1)]):
            ours = "".join(prompt.text(grid, k, len(grids)) for k, grid in enumerate(grids))
            assert ours == their_get_image_string(tokenizer, grids, 4)


def test_the_first_release_is_refused_with_the_reason(tmp_path: Path) -> None:
    # models/config.py of the first release: no extra tokens, no chat template, no mp_image_token_length.
    config = their_config(lm_vocab_size=BASE_VOCAB)
    for key in ("vlm_extra_tokens", "lm_chat_template", "mp_image_token_length", "max_img_size"):
        del config[key]
    write_checkpoint(tmp_path, config, their_state(config))
    with pytest.raises(CheckpointError, match="first release.*'Question: ... Answer:'.*never saw"):
        read_nanovlm(tmp_path)
    with pytest.raises(CheckpointError, match="first release"):
        VisionLanguageModel.from_pretrained(tmp_path)


def _broken(state: dict[str, torch.Tensor], problem: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if problem == "missing":
        del state["vision_encoder.blocks.1.attn.qkv_proj.bias"]
    elif problem == "unexpected":
        state["vision_encoder.extra.weight"] = torch.zeros(3)
    else:
        state["MP.proj.weight"] = torch.zeros(48, 32 * 9)
    return state


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", r"missing \(1\): vision_encoder\.blocks\.1\.attn\.qkv_proj\.bias"),
        ("unexpected", r"unexpected \(1\): vision_encoder\.extra\.weight"),
        ("shape mismatch", r"shape mismatch \(1\): MP\.proj\.weight: checkpoint \(48, 288\) vs \(48, 128\)"),
    ],
)
def test_a_tensor_that_does_not_fit_is_one_clear_error(tmp_path: Path, problem: str, message: str) -> None:
    config = their_config()
    folder = write_checkpoint(tmp_path, config, _broken(their_state(config), problem))
    with pytest.raises(CheckpointError, match=message) as caught:
        read_nanovlm(folder)
    assert str(caught.value).count("\n") == 1  # one problem, one line under the heading


def test_a_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(their_config()))
    (tmp_path / "nanoVLM-222M.pth").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        read_nanovlm(tmp_path)


def test_a_cls_token_vit_is_refused_with_the_reason(tmp_path: Path) -> None:
    config = their_config(vit_cls_flag=True)
    write_checkpoint(tmp_path, config, their_state(config))
    with pytest.raises(CheckpointError, match="vit_cls_flag is true.*cannot represent"):
        read_nanovlm(tmp_path)


def test_a_rope_base_that_disagrees_with_the_stored_frequencies_is_refused(tmp_path: Path) -> None:
    config = their_config()
    write_checkpoint(tmp_path, their_config(lm_re_base=10000), their_state(config))
    with pytest.raises(CheckpointError, match=r"inv_freq is not the RoPE of lm_re_base 10000"):
        read_nanovlm(tmp_path)


def test_a_config_whose_token_count_disagrees_is_refused(tmp_path: Path) -> None:
    config = their_config(mp_image_token_length=64)
    write_checkpoint(tmp_path, config, their_state(config))
    with pytest.raises(CheckpointError, match="mp_image_token_length 64 is not the 4 tokens"):
        read_nanovlm(tmp_path)


def test_the_text_config_sets_every_number(saved) -> None:
    config, _, checkpoint = saved
    llama = LlamaConfig(**checkpoint.text_config)
    assert (
        llama.rope_parameters["rope_theta"]
        == float(config["lm_re_base"])
        == checkpoint.text_config["rope_theta"]
    )
    assert (llama.num_key_value_heads, llama.head_dim, llama.vocab_size) == (
        2,
        8,
        BASE_VOCAB + len(EXTRA_TOKENS),
    )
    assert (llama.rms_norm_eps, llama.max_position_embeddings, llama.tie_word_embeddings) == (
        1e-5,
        8192,
        True,
    )
    assert llama.hidden_act == "silu" and not llama.attention_bias and not llama.mlp_bias
    assert math.isclose(llama.attention_dropout, 0.0)


# -- end to end: VisionLanguageModel.from_pretrained(<nanoVLM folder>) answers as nanoVLM does ------------------

IMAGE_ONLY = {"image_token": EXTRA_TOKENS["image_token"]}
# Each version vlm reads, by what its config.json holds (vlm/nanovlm.py): extra tokens, and overrides.
VERSIONS = {
    "squashed": (IMAGE_ONLY, {"max_img_size": None}),
    "tiles": (IMAGE_ONLY, {}),
    "tile-tokens": ({**IMAGE_ONLY, **TILE_TOKENS}, {}),
    "global": (EXTRA_TOKENS, {}),
    "global-max-side": (EXTRA_TOKENS, {"resize_to_max_side_len": True}),
}
SIZES = ((40, 20), (20, 50), (12, 10))  # 2x3, 4x2 and 1x1 tiles of 16 px (4x4 with resize_to_max_side_len)


def e2e_config(smollm2_folder: str, version: str) -> dict:
    """A checkpoint of `version` over SmolLM2's tokenizer (a local folder as lm_tokenizer, as a trained nanoVLM
    names its hub id): lm_vocab_size is the tokenizer's and the extra tokens'."""
    tokens, overrides = VERSIONS[version]
    config = their_config(
        lm_tokenizer=str(smollm2_folder), vlm_extra_tokens=dict(tokens), extra_token_amount=len(tokens),
        lm_base_vocab_size=SMOLLM2_VOCAB, lm_vocab_size=SMOLLM2_VOCAB + len(tokens), **overrides,
    )  # fmt: skip
    if config["max_img_size"] is None:  # versions before tiles had no such field
        del config["max_img_size"], config["resize_to_max_side_len"]
    return config


@pytest.fixture(scope="module", autouse=True)
def lm_cache(smollm2_folder, tmp_path_factory):
    """The LMs written out of the checkpoints stay out of ~/.cache (SmolLM2's own, converted once from its GGUF
    file, is found there first)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLM_CACHE", str(tmp_path_factory.mktemp("vlm-cache")))
        yield


@pytest.fixture(scope="module")
def versions(smollm2_folder, tmp_path_factory) -> dict[str, tuple]:
    """version -> (folder, config, state, their tokenizer, the model vlm loads from the folder)."""
    out = {}
    for i, version in enumerate(VERSIONS):
        config = e2e_config(smollm2_folder, version)
        state = their_state(config, seed=10 + i)
        folder = write_checkpoint(tmp_path_factory.mktemp(version), config, state)
        out[version] = (
            folder,
            config,
            state,
            their_tokenizer(config),
            VisionLanguageModel.from_pretrained(folder),
        )
    return out


def ours_vs_theirs(
    model: VisionLanguageModel, config: dict, state: dict, tokenizer, images: list[Image.Image]
) -> None:
    """Our prompt ids, pixels, logits and greedy text equal what nanoVLM makes of the same question."""
    theirs = [their_pixels(image, config, tokenizer) for image in images]
    pixels = torch.cat([t[0] for t in theirs])
    ids = torch.tensor([their_prompt_ids(tokenizer, config, [t[1] for t in theirs], QUESTION)])
    batch = model.prepare([[user(QUESTION, images)]], for_generation=True)
    assert batch.input_ids.tolist() == ids.tolist(), model.tokenizer.decode(batch.input_ids[0])
    assert torch.equal(batch.pixel_values, pixels)  # bit for bit
    with torch.no_grad():
        ours = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        reference = their_lm(state, config, their_embeddings(state, config, tokenizer, ids, pixels))
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    if len(images) == 1:
        with torch.no_grad():
            expected = their_greedy_text(state, config, tokenizer, ids, pixels, 8)
        assert model.ask(images[0], QUESTION, max_new_tokens=8) == expected


@pytest.mark.parametrize("version", list(VERSIONS))
def test_a_nanovlm_checkpoint_answers_as_nanovlm_does(versions, version):
    folder, config, state, tokenizer, model = versions[version]
    layout = "nanovlm" if "r1c1" in config["vlm_extra_tokens"] else "plain"
    assert (model.config.image_layout, model.config.part_joiner, model.config.lm_source) == (
        layout,
        "",
        str(folder),
    )
    assert model.config.image_processing.tiling == ("idefics3" if version == "squashed" else "nanovlm")
    for k, size in enumerate(SIZES):
        ours_vs_theirs(model, config, state, tokenizer, [test_image(*size, seed=k)])
    if layout == "nanovlm":  # several images in one question: their `<image: i>` numbering
        ours_vs_theirs(
            model, config, state, tokenizer, [test_image(*size, seed=k) for k, size in enumerate(SIZES)]
        )


def test_nanovlm_tiling_makes_their_pixels_for_any_size(smollm2_folder):
    """The processor alone, over many shapes (thin, square, larger than max_img_size, smaller than a tile)."""
    rng = np.random.default_rng(0)
    for version in ("tiles", "global", "global-max-side"):
        config = e2e_config(smollm2_folder, version)
        tokens = SimpleNamespace(**config["vlm_extra_tokens"])
        processing = ImageProcessing(
            Image.Resampling.BICUBIC, (0.0,) * 3, (1.0,) * 3, 64, True, "nanovlm",
            global_image=hasattr(tokens, "global_image_token"), resize_to_longest_edge=config["resize_to_max_side_len"],
        )  # fmt: skip
        processor = SiglipImageProcessor.of(16, processing)
        for width, height in [
            (1, 1),
            (7, 100),
            (100, 7),
            (16, 16),
            (17, 16),
            (130, 90),
            *rng.integers(1, 90, (6, 2)),
        ]:
            image = test_image(int(width), int(height), seed=int(width))
            pixels, grid = their_pixels(image, config, tokens)
            tiles = processor.tiles(image)
            assert tiles.grid == grid and torch.equal(tiles.pixels, pixels), (version, width, height)


def test_saved_the_vlm_way_it_reloads_from_the_nanovlm_folder(versions, tmp_path):
    folder, _, _, _, loaded = versions["global"]
    model = copy.deepcopy(loaded)  # the fixture's model stays as loaded
    with torch.no_grad():
        model.projector.linear_1.weight.mul_(1.5)  # as if fine-tuned
    model.save_pretrained(tmp_path / "mine")
    saved = json.loads((tmp_path / "mine" / "config.json").read_text())
    assert saved["lm_source"] == str(folder) and saved["part_joiner"] == ""
    assert saved["image_processing"]["tiling"] == "nanovlm" and saved["image_layout"] == "nanovlm"
    again = VisionLanguageModel.from_pretrained(tmp_path / "mine")
    assert again.config == model.config
    batch = model.prepare([[user(QUESTION, [test_image(40, 20, seed=3)])]], for_generation=True)
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        got = again(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_a_config_json_from_before_these_fields_loads_with_the_old_defaults(versions):
    d = versions["squashed"][-1].config.to_dict()
    del d["part_joiner"]
    for key in ("tiling", "global_image", "resize_to_longest_edge"):
        del d["image_processing"][key]
    old = VLMConfig.from_dict(d)
    assert old.part_joiner == "\n" and old.image_processing.tiling == "idefics3"
    assert old.image_processing.global_image and not old.image_processing.resize_to_longest_edge


def test_the_cli_answers_with_a_nanovlm_checkpoint(versions, tmp_path, capsys):
    from vlm.cli import main

    folder, config, state, tokenizer, _ = versions["global"]
    picture = tmp_path / "picture.png"
    test_image(40, 20, seed=7).save(picture)
    assert (
        main(["ask", "--model", str(folder), "--image", str(picture), "--max-new-tokens", "6", QUESTION]) == 0
    )
    pixels, grid = their_pixels(Image.open(picture).convert("RGB"), config, tokenizer)
    ids = torch.tensor([their_prompt_ids(tokenizer, config, [grid], QUESTION)])
    with torch.no_grad():
        expected = their_greedy_text(state, config, tokenizer, ids, pixels, 6)
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.parametrize("version", ["squashed", "global"])
def test_export_to_transformers_is_refused_with_the_reason(versions, version, tmp_path):
    model = versions[version][-1]
    with pytest.raises(ValueError, match="as nanoVLM does.*no transformers processor"):
        model.save_pretrained(tmp_path / "out", format="transformers")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"vlm_extra_tokens": {**EXTRA_TOKENS, "r1c1": "<tile_1_1>"}},
            r"r1c1 '<tile_1_1>' \(wanted '<row_1_col_1>'\)",
        ),
        ({"vlm_extra_tokens": {**EXTRA_TOKENS, "boi_token": "<boi>"}}, "do not use \\(boi_token\\)"),
        ({"vlm_extra_tokens": {**IMAGE_ONLY, "global_image_token": "<|global_image|>"}}, "no tile tokens"),
        ({"max_img_size": None}, "no max_img_size"),
        ({"max_img_size": 40}, "max_img_size 40 is not a whole number of 16-px tiles"),
    ],
    ids=["tile-names", "fork-tokens", "global-alone", "tiles-unsized", "max-size"],
)
def test_a_version_vlm_cannot_imitate_is_refused_with_the_reason(smollm2_folder, tmp_path, change, message):
    config = {**e2e_config(smollm2_folder, "global"), **change}
    config = {k: v for k, v in config.items() if v is not None}
    config["lm_vocab_size"] = SMOLLM2_VOCAB + len(config["vlm_extra_tokens"])
    write_checkpoint(tmp_path, config, their_state(config))
    with pytest.raises(CheckpointError, match=message):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_a_tokenizer_larger_than_the_embedding_is_refused(smollm2_folder, tmp_path):
    config = e2e_config(smollm2_folder, "global")
    config["lm_vocab_size"] -= 1  # one extra token without a row
    write_checkpoint(tmp_path, config, their_state(config))
    with pytest.raises(CheckpointError, match="49170 tokens, more than the 49169 rows"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_fine_tuning_starts_from_a_nanovlm_checkpoint(versions, tmp_path):
    """`model.init: <nanoVLM folder>`: its tiles and prompts in the training batches, LoRA on its LM; the result
    saves the vlm way and reloads to the same logits."""
    from scripts import load_script

    from vlm.config import load_config

    ft = load_script("finetune")
    folder = versions["global"][0]
    cfg = load_config(ft.FinetuneConfig, None, [
        f"--model.init={folder}", "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0",
        "--data.train=[{kind: vqa, name: easy-vqa, limit: 4}]", "--data.eval=null",
        f"--train.out_dir={tmp_path / 'run'}", "--train.batch_size=2", "--train.warmup_steps=1",
        "--train.log_every=1", "--train.steps=2", "--train.lr=5e-3", "--train.lr_projector=5e-3",
        "--train.bf16=false", "--train.checkpoint_every=100",
    ])  # fmt: skip
    model = ft.train(cfg)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "run" / "final")
    assert reloaded.config.lm_source == str(folder) and reloaded.config.image_layout == "nanovlm"
    batch = model.prepare([[user(QUESTION, [test_image(40, 20, seed=4)])]], for_generation=True)
    with torch.no_grad():
        expected = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        torch.testing.assert_close(
            reloaded(batch.input_ids, batch.attention_mask, batch.pixel_values).logits, expected
        )
