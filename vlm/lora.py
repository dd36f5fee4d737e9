"""LoRA on a `VisionLanguageModel` through peft, targeted by a regex over full module names.

The adapter is injected into the whole VLM (not the bare LM), so one regex decides where LoRA goes, the
vision tower included when asked (`vision\\.encoder\\.layers\\.\\d+\\.self_attn\\.(q|k|v|out)_proj`), and
a regex anchored at `lm\\.` can never land on the tower by accident. The adapter folder is peft's format
(`adapter_config.json` + `adapter_model.safetensors`) with keys named after the VLM's modules.

This module sits below `vlm.model` (which imports it when a model has an adapter): it works on any module that
has a `config.freeze` tuple and a `freeze(paths)` method, as `VisionLanguageModel` does, and never imports it.

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021; Dettmers et al.,
"QLoRA", 2023 (the LM in 4-bit with LoRA on top: `VisionLanguageModel.build(..., quantization="4bit")`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.checks import config_from_dict, json_object
from vlm.lm import LMQuantization, quiet_bitsandbytes_import
from vlm.weights import CheckpointError, atomic_folder, check_output_folder, read_json

with quiet_bitsandbytes_import():  # peft imports bitsandbytes, which may warn about a kernel we never want
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

# Every attention and MLP projection of a Llama-style LM (SmolLM2), and nothing outside `lm.`.
LM_ALL_LINEAR = r"lm\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target: str = LM_ALL_LINEAR  # a regex, matched against full module names (re.fullmatch)

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target
        )


def add_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject LoRA adapters; returns the adapted module names. The model's freeze policy still holds for the
    base weights, and the new LoRA weights are trainable."""
    try:
        inject_adapter_in_model(settings.peft_config(), model)
    except ValueError as err:  # peft's "Target modules ... not found in the base model"
        raise ValueError(f"LoRA target regex {settings.target!r} matches no module of the model") from err
    model.freeze(model.config.freeze)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad = True
    return lora_modules(model)


def lora_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def adapter_differences(model: nn.Module, settings: LoraSettings) -> list[str]:
    """How the adapter `model` already has differs from the one `settings` would inject: its rank, its alpha
    (together they scale every update: alpha / r), the modules it adapts. Empty when they agree. Dropout is not
    compared: it shapes training, not the adapter (`set_dropout`)."""
    adapted = lora_modules(model)
    layers = [model.get_submodule(name) for name in adapted]
    ranks = sorted({layer.r[a] for layer in layers for a in layer.active_adapters})
    alphas = sorted({layer.lora_alpha[a] for layer in layers for a in layer.active_adapters})
    differences = []
    if ranks != [settings.r]:
        differences.append(f"r {'/'.join(map(str, ranks))}, not {settings.r}")
    if alphas != [settings.alpha]:
        differences.append(f"alpha {'/'.join(map(str, alphas))}, not {settings.alpha}")
    inside = tuple(f"{name}." for name in adapted)  # a LoRA layer's own parts (base_layer, lora_A, ...)
    # what peft's LoRA adapts here: linear layers (bitsandbytes' too), or the LoRA layers that wrap them
    linear = (nn.Linear, LoraLayer)
    wanted = {
        name
        for name, module in model.named_modules()
        if isinstance(module, linear) and re.fullmatch(settings.target, name) and not name.startswith(inside)
    }
    if wanted != set(adapted):
        lacking, extra = wanted - set(adapted), set(adapted) - wanted
        differences.append(
            f"target: {len(lacking)} modules it lacks ({_first(lacking)}) and {len(extra)} the target would not "
            f"adapt ({_first(extra)})"
        )
    return differences


def _first(names: set[str]) -> str:
    """The first two of `names`, for a message ("a, b, ..." when there are more)."""
    return ", ".join(sorted(names)[:2]) + (", ..." if len(names) > 2 else "")


def set_dropout(model: nn.Module, p: float) -> None:
    """Every LoRA layer's dropout (on the layer's input, before A) set to `p`: a loaded adapter trains with
    the dropout its run asks for, whatever the run that made it used."""
    for name in lora_modules(model):
        layer = model.get_submodule(name)
        for adapter in layer.active_adapters:
            layer.lora_dropout[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()


def save_adapter(model: nn.Module, directory: str | Path, settings: LoraSettings) -> Path:
    """peft's adapter format: adapter_config.json (with our settings beside it) + adapter_model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = settings.peft_config().to_dict()
    config["target_modules"] = settings.target
    config["vlm_lora"] = asdict(settings)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> LoraSettings:
    """Inject and load a saved adapter, strictly: every saved LoRA weight must find its module."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{directory} is not a LoRA adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    config = read_json(directory / ADAPTER_CONFIG, f"{directory} has no {ADAPTER_CONFIG}")
    where = f"{directory / ADAPTER_CONFIG}: vlm_lora"
    settings = config_from_dict(
        LoraSettings, json_object(config.get("vlm_lora"), where), where, ignore_unknown=False
    )
    add_lora(model, settings)
    state = load_file(directory / ADAPTER_WEIGHTS)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as err:  # torch's size mismatches: weights saved under other settings than recorded
        problem = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise CheckpointError(
            f"{directory}: the adapter's weights do not fit its {ADAPTER_CONFIG} (r={settings.r}): {problem}"
        ) from err
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in get_peft_model_state_dict(model) if k not in state]
    if unexpected or missing:
        raise CheckpointError(
            f"{directory}: adapter keys do not fit: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    return settings


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W + B A * alpha / r) and remove the adapter modules,
    leaving a plain model with the same outputs.

    A base layer quantised by bitsandbytes (QLoRA) becomes a full-precision `nn.Linear` holding dequant(W) + BA,
    which is what the quantised layer and its adapter computed together (peft's own merge quantises that sum
    again, rounding much of the small update away). The model's other quantised layers are dequantised too, so
    it is left wholly in full precision, its `config.quantization` None."""
    for name in lora_modules(model):
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        if is_quantized(base):
            merged = dequantized(base)
            with torch.no_grad():
                for adapter in layer.active_adapters:  # plain LoRA (LoraSettings makes no DoRA)
                    merged.weight += layer.get_delta_weight(adapter).to(merged.weight.dtype)
        else:
            layer.merge()
            merged = base
        model.set_submodule(name, merged)
    dequantize(model)
    return model


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit or 8-bit linear layer (bitsandbytes is imported only if it already is)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantized(layer: nn.Module) -> nn.Linear:
    """A bitsandbytes linear layer's weights as a plain `nn.Linear`, frozen: 4-bit blocks times their absmax
    (`dequantize_4bit`, in the dtype the weights were loaded in), or 8-bit rows times their scales (float32)."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        w = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # (out, in)
    else:
        w = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(w.dtype), requires_grad=False)
    return linear


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes layer of `model` by its `dequantized` twin and clear what says the model is
    quantised: transformers' record on the LM (so `save_pretrained` writes a plain model) and
    `config.quantization` (so a reload does not quantise it again)."""
    for name, module in [(n, m) for n, m in model.named_modules() if is_quantized(m)]:
        model.set_submodule(name, dequantized(module))
    for module in model.modules():
        if getattr(module, "hf_quantizer", None) is not None:
            module.hf_quantizer.remove_quantization_config(module)
            for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
                if hasattr(module, flag):
                    delattr(module, flag)
    if getattr(getattr(model, "config", None), "quantization", None) is not None:
        model.config = replace(model.config, quantization=None)
    return model


def save_merged(model: nn.Module, directory: str | Path) -> Path:
    """A standalone model folder with LoRA folded in: the VLM files plus the merged LM (and tokenizer) in
    `lm/`, named by a relative `lm_source`, so the folder loads anywhere without the original LM, and a
    README.md that says so.

    A model whose LM is quantised (QLoRA) is merged in full precision (`merge_lora`): its config records no
    quantization, and the README says which quantization it was trained against.

    `directory` must be new (or an empty folder): merged files written over a model folder would sit beside
    its `adapter/`, which loading would then apply a second time. The folder is filled under a temporary name
    and renamed when complete, so a failed merge leaves nothing behind."""
    directory = check_output_folder(directory, "the merged model's folder", empty=True)
    trained = getattr(model.config, "quantization", None)
    merge_lora(model)
    with atomic_folder(directory) as tmp:
        lm_dir = tmp / "lm"
        model.lm.save_pretrained(lm_dir)
        model.tokenizer.save_pretrained(lm_dir)
        # The saved LM already holds the image token's row, so the VLM files carry no added rows of their own.
        source, vocab = model.config.lm_source, model.lm_vocab_size
        model.config = replace(model.config, lm_source="lm")
        model.lm_vocab_size = model.lm.get_input_embeddings().num_embeddings
        try:
            model.save_pretrained(tmp)
        finally:
            model.config, model.lm_vocab_size = replace(model.config, lm_source=source), vocab
        (tmp / "README.md").write_text(merged_card(directory.name, trained))
    return directory


def merged_card(name: str, trained: LMQuantization | None) -> str:
    """The README.md of a merged folder; `trained`: the quantization the adapter was trained against."""
    lines = [
        "---",
        "library_name: vlm",
        "---",
        f"# {name}",
        "",
        "A standalone model made by `vlm merge`: the LoRA adapter folded into the LM, which `lm/` holds with "
        "its tokenizer.",
    ]
    if trained is not None:
        lines += [
            "",
            f"Merged from a model whose adapter was trained against its LM in {trained}: those weights were "
            "dequantised and the LoRA update added in full precision, so this model runs in full precision and "
            "its config.json records no quantization. Its logits differ from the quantised model with its "
            "adapter by float rounding (the two compute dequant(W) x + B A x in another order); the original "
            "folder reproduces the quantised answers exactly.",
        ]
    return "\n".join(lines) + "\n"


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every LoRA layer of `model` bypassed for the duration: the base weights alone answer. The adapters'
    requires_grad flags are restored after (peft's `enable_adapters(True)` would make them all trainable)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad = flag
