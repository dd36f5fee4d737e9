"""Pieces of generation that are not the model: stopping on an event, naming images for caching, an LRU cache of
image embeddings, the token prefix a batch of prompts shares. `vlm.model.VisionLanguageModel` uses them for
`generate` and `generate_answers`; they know nothing of the model (the cache is handed an encode function).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from vlm.processing import ImageSource


class StopWhenSet(StoppingCriteria):
    """Ends `generate` (every row) once the event is set; checked after each new token."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def image_key(image: ImageSource) -> Hashable:
    """A key naming an image for caching: its path, its bytes, or (PIL images) the object's identity."""
    if isinstance(image, (str, Path)):
        return ("path", str(image))
    if isinstance(image, (bytes, bytearray)):
        return ("bytes", bytes(image))
    if isinstance(image, Image.Image):
        # Identity, not content: hashing pixels would cost about what loading them does. The caller's list
        # keeps the object alive, so its id cannot be reused meanwhile.
        return ("pil", id(image))
    raise TypeError(f"an image is a path, bytes or a PIL image, got {type(image).__name__}")


class ImageEmbeddingCache:
    """Least-recently-used image embeddings (e.g. LM-ready (tiles * tokens_per_image, D_lm)) by `image_key`,
    bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def embeddings(
        self,
        keys: Sequence[Hashable],
        sources: Mapping[Hashable, ImageSource],
        encode: Callable[[list[ImageSource]], torch.Tensor],
    ) -> torch.Tensor:
        """The embeddings of the images `keys` name (`sources[key]`), concatenated along the first dimension
        (e.g. (sum of their tokens, D_lm)): `encode` runs once, on the distinct images not cached, and returns one
        tensor per image."""
        found = {key: self._get(key) for key in dict.fromkeys(keys)}
        if missing := [key for key, embeds in found.items() if embeds is None]:
            for key, embeds in zip(missing, encode([sources[key] for key in missing]), strict=True):
                found[key] = embeds
                self._put(key, embeds.clone())  # a clone: a view would keep the whole batch's tensor alive
        return torch.cat([found[key] for key in keys])

    def _get(self, key: Hashable) -> torch.Tensor | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def _put(self, key: Hashable, embeds: torch.Tensor) -> None:
        self.entries[key] = embeds
        self.bytes += embeds.numel() * embeds.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


def shared_prefix_length(ids: Sequence[Sequence[int]], stop_token_id: int) -> int:
    """Length of the token prefix all prompts share, up to their first `stop_token_id` (the image placeholder:
    image embeddings differ from row to row), leaving every prompt at least one token of its own."""
    shortest = min(len(x) for x in ids)
    n = 0
    while n < shortest - 1 and ids[0][n] != stop_token_id and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar counting questions (disabled: a no-op with the same methods)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)
