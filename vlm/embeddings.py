"""Image files -> SigLIP embeddings, batched, for reuse of the vision encoder on its own (`vlm embed`).

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

from vlm.processing import ImageLoadError, SiglipImageProcessor, iter_image_files, load_image
from vlm.siglip import SiglipVisionEncoder


@dataclass
class Embeddings:
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
    """Embed every image file under `paths` (files, or folders searched recursively).

    Unreadable files are skipped and reported in `.failures`, never fatal. Images are decoded one batch at
    a time, so a large folder needs memory for one batch only."""
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
                vectors.append(encoder.embed(processor(images), pooled=pooled, batch_size=batch_size))
            bar.update(min(batch_size, len(files) - start))
    if not vectors:
        width = encoder.config.hidden_size
        empty = torch.empty(0, width) if pooled else torch.empty(0, encoder.config.num_patches, width)
        return Embeddings(empty, kept, failures)
    return Embeddings(torch.cat(vectors), kept, failures)


def save_embeddings(result: Embeddings, path: str | Path, model: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "files": json.dumps(result.files),
        "model": model,
        "kind": "pooled" if result.vectors.ndim == 2 else "patches",
    }
    save_file({"embeddings": result.vectors.contiguous()}, path, metadata=metadata)
    return path


def load_embeddings(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """The vectors and their file names, as written by `save_embeddings`."""
    with safe_open(Path(path), framework="pt") as f:
        return f.get_tensor("embeddings"), json.loads(f.metadata()["files"])
