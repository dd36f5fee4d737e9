"""vlm: a small vision-language model — a from-scratch SigLIP encoder, a projector and a pretrained causal LM.

    from vlm import load_default_model, load_vision_encoder, embed_images, load_dual_encoder, zero_shot

`import vlm` is light: the public names below are imported from their modules on first use (PEP 562), so the
command line starts without torch, and nothing imports transformers, peft or gradio before it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # the vision-language model (assembly)
    "Chat": "vlm.model",
    "VLMConfig": "vlm.model",
    "VisionLanguageModel": "vlm.model",
    "load_default_model": "vlm.model",
    # the towers
    "SiglipConfig": "vlm.siglip_model",
    "SiglipModel": "vlm.siglip_model",
    "SiglipOutput": "vlm.siglip_model",
    "SiglipTextConfig": "vlm.siglip_text",
    "SiglipTextEncoder": "vlm.siglip_text",
    "SiglipTextOutput": "vlm.siglip_text",
    "SiglipVisionConfig": "vlm.siglip",
    "SiglipVisionEncoder": "vlm.siglip",
    "SiglipVisionOutput": "vlm.siglip",
    "retrieval_recall": "vlm.siglip_model",
    # checkpoints
    "CheckpointError": "vlm.weights",
    "load_siglip_model": "vlm.weights",
    "load_vision_encoder": "vlm.weights",
    "save_siglip_model": "vlm.weights",
    "save_vision_encoder": "vlm.weights",
    # images
    "ImageLoadError": "vlm.processing",
    "SiglipImageProcessor": "vlm.processing",
    "load_image": "vlm.processing",
    # embeddings of the vision tower, and zero-shot / retrieval with the dual encoder
    "embed_files": "vlm.embeddings",
    "embed_images": "vlm.embeddings",
    "load_embeddings": "vlm.embeddings",
    "load_dual_encoder": "vlm.zeroshot",
    "retrieval": "vlm.zeroshot",
    "zero_shot": "vlm.zeroshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """`vlm.<name>`: import the defining module on first use and cache the value in this module."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
