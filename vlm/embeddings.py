"""Images -> SigLIP embeddings, batched, for reuse of the vision encoder on its own (`vlm embed`).

    encoder = load_vision_encoder("google/siglip-base-patch16-224")    # vlm.weights: hub id or folder
    vectors = embed_images(encoder, ["cat.jpg", "dog.png"])             # (2, D) pooled embeddings

The output is one safetensors file: the tensor `embeddings` ((B, D) pooled or (B, N, D) patch tokens) and,
in its metadata, the JSON list of the source file names in row order, the model and the mode, so the
vectors never travel without the names they belong to.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from vlm.checks import positive_int
from vlm.processing import (
    ImageLoadError,
    ImageSource,
    SiglipImageProcessor,
    image_sequence,
    iter_image_files,
    load_image,
)
from vlm.siglip import SiglipVisionEncoder
from vlm.weights import atomic_file


def embed_images(
    encoder: SiglipVisionEncoder,
    images: torch.Tensor | ImageSource | Sequence[ImageSource],
    pooled: bool = True,
    batch_size: int = 32,
) -> torch.Tensor:
    """Images (paths, PIL images, bytes, or preprocessed (B, C, H, W) pixels; one image is a batch of one) ->
    float32 embeddings: (B, D) pooled (`SiglipVisionEncoder.embed`), or (B, N, D) patch embeddings with
    `pooled=False`, on the encoder's device (the pixels are moved to it).

    Images are decoded and preprocessed a batch at a time, so a long list never sits in memory as pixels;
    an unreadable image raises `ImageLoadError` naming it (`embed_files` skips such files instead)."""
    positive_int(batch_size, "batch_size")
    if isinstance(images, torch.Tensor):
        return encoder.embed(images, pooled=pooled, batch_size=batch_size)
    images, processor = image_sequence(images), SiglipImageProcessor(encoder.config.image_size)
    outs = [
        encoder.embed(
            processor(list(images[start : start + batch_size])), pooled=pooled, batch_size=batch_size
        )
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(outs) if outs else _no_vectors(encoder, pooled)


def _no_vectors(
    encoder: SiglipVisionEncoder, pooled: bool, device: torch.device | None = None
) -> torch.Tensor:
    """The (0, D) or (0, N, D) result of embedding no image, on `device` (None: the encoder's)."""
    width, device = encoder.config.hidden_size, device or next(encoder.parameters()).device
    shape = (0, width) if pooled else (0, encoder.config.num_patches, width)
    return torch.empty(shape, device=device)


@dataclass
class Embeddings:
    """What `embed_files` returns: the vectors, the files they belong to, and the files it skipped."""

    vectors: torch.Tensor  # (B, D) pooled, or (B, N, D) patch embeddings
    files: list[str]  # row i of `vectors` belongs to files[i]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of the skipped ones


def embed_files(
    encoder: SiglipVisionEncoder,
    paths: Sequence[str | Path],
    pooled: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> Embeddings:
    """Embed every image file under `paths` (files, or folders searched recursively); the vectors come back
    on the CPU, whatever the encoder's device.

    Unreadable files are skipped and reported in `.failures`, never fatal. Images are decoded one batch at
    a time, so a large folder needs memory for one batch only (on a GPU too: each batch's vectors leave it)."""
    positive_int(batch_size, "batch_size")
    files = iter_image_files(paths)
    processor = SiglipImageProcessor(encoder.config.image_size)
    vectors: list[torch.Tensor] = []
    kept: list[str] = []
    failures: list[tuple[str, str]] = []
    with tqdm(total=len(files), desc="embedding", unit="img", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            images = []
            for file in files[start : start + batch_size]:
                try:
                    images.append(load_image(file))
                    kept.append(str(file))
                except ImageLoadError as err:
                    failures.append((str(file), err.reason))
            if images:
                vectors.append(encoder.embed(processor(images), pooled=pooled, batch_size=batch_size).cpu())
            bar.update(min(batch_size, len(files) - start))
    found = torch.cat(vectors) if vectors else _no_vectors(encoder, pooled, torch.device("cpu"))
    return Embeddings(found, kept, failures)


def save_embeddings(result: Embeddings, path: str | Path, model: str = "") -> Path:
    """Write `result` to one safetensors file: the tensor `embeddings`, and the file names, `model` and the
    kind (pooled or patches) in its metadata. Returns the path. The file appears whole or not at all (written
    under a temporary name, then renamed)."""
    path = Path(path)
    metadata = {
        "files": json.dumps(result.files),
        "model": model,
        "kind": "pooled" if result.vectors.ndim == 2 else "patches",
    }
    with atomic_file(path) as tmp:
        save_file({"embeddings": result.vectors.contiguous()}, tmp, metadata=metadata)
    return path


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The vectors and their file names, as written by `save_embeddings`."""
    with safe_open(Path(path), framework="pt") as f:
        return f.get_tensor("embeddings"), json.loads(f.metadata()["files"])
