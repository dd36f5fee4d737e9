"""Pictures of what a SigLIP vision tower has learned: patch filters, position embeddings, attention.

References
- Dosovitskiy et al., "An Image is Worth 16x16 Words" (ViT), 2021, Figure 7: the RGB embedding filters
  (left) and the cosine similarity of each position embedding to all others (centre).
- The source chapter's "Visualizing Embeddings": random-init filters and position embeddings are noise,
  trained ones are smooth and structured. `write_visualisations` is run once per model (`vlm viz`) so the
  two can be put side by side.

Every function reads the model without autograd (and in eval mode) and casts to float32 before plotting,
so a bf16 model on any device works. Figures are drawn with matplotlib's Agg backend (no display needed),
saved as PNG and closed.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window, also on machines without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402  # images are loaded by `vlm.processing`; here only drawn on

from vlm.siglip import SiglipVisionEncoder  # noqa: E402

FILTERS_PNG = "patch_filters.png"
POSITIONS_PNG = "position_similarity.png"
ATTENTION_PNG = "attention.png"
DPI = 150
# Beyond this many positions per side the ViT grid of maps becomes unreadable; show an even subsample.
MAX_POSITION_MAPS = 16


def _mosaic(tiles: np.ndarray, cols: int) -> np.ndarray:
    """(n, h, w, ...) tiles -> one (rows * h, cols * w, ...) image, row-major, NaN where no tile is.

    One `imshow` of a mosaic draws in milliseconds and keeps every tile pixel-sharp, where a subplot per
    tile (196 for the ViT figure) is slow and spends most of the figure on margins."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * h, cols * w, *tiles.shape[3:]), np.nan)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return out


def _separate_tiles(ax: plt.Axes, rows: int, cols: int, h: int, w: int, width: float = 1.5) -> None:
    """White lines between the mosaic's tiles. Drawn as lines, not as blank pixels in the image, so they
    come out equally thick whatever the ratio of image pixels to figure pixels."""
    for r in range(1, rows):
        ax.axhline(r * h - 0.5, color="white", linewidth=width)
    for c in range(1, cols):
        ax.axvline(c * w - 0.5, color="white", linewidth=width)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)  # figures are global state in pyplot; an open one per call would leak
    return path


def plot_patch_filters(encoder: SiglipVisionEncoder, path: str | Path, max_filters: int = 64) -> Path:
    """Draw the first `max_filters` patch-embedding filters as RGB tiles in a square grid; return `path`.

    Each filter (3, p, p) of `embeddings.patch_embedding` is min-max normalised on its own, across all three
    channels, so its colour balance survives. Random init looks like coloured static; trained filters
    show smooth colour blobs and oriented edges (the ViT paper's Figure 7, left)."""
    weight = encoder.embeddings.patch_embedding.weight[:max_filters].detach().float().cpu()  # (n, C, p, p)
    n = weight.shape[0]
    lo = weight.amin(dim=(1, 2, 3), keepdim=True)
    hi = weight.amax(dim=(1, 2, 3), keepdim=True)
    tiles = ((weight - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    # RGB for the usual 3 channels; any other channel count is shown as the channel mean, in grey.
    tiles = tiles.transpose(0, 2, 3, 1) if tiles.shape[1] == 3 else tiles.mean(1)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = _mosaic(tiles, cols)
    # Empty cells white: NaN cannot be drawn in an RGB image, so fill it; grey tiles get "bad" = white.
    cmap = plt.get_cmap("gray").with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(6, 6 * rows / cols + 0.4))
    ax.imshow(
        np.nan_to_num(mosaic, nan=1.0) if mosaic.ndim == 3 else mosaic, cmap=cmap, interpolation="nearest"
    )
    _separate_tiles(ax, rows, cols, *tiles.shape[1:3], width=4)
    ax.set_axis_off()
    p = weight.shape[-1]
    ax.set_title(f"Patch-embedding filters: {n} of {encoder.config.hidden_size}, {p}x{p} px each")
    return _save(fig, path)


def position_similarity(encoder: SiglipVisionEncoder) -> torch.Tensor:
    """Cosine similarity between every pair of learned position embeddings: (N, N) float32, diagonal 1.

    Row i, reshaped to the (grid, grid) patch layout, is the map of how alike position i is to every
    other position; trained models give a smooth blob around i, random ones a lone bright pixel."""
    with torch.no_grad():
        pos = F.normalize(encoder.embeddings.position_embedding.weight.float(), dim=-1)  # (N, D), unit rows
        return (pos @ pos.T).cpu()


def plot_position_similarity(encoder: SiglipVisionEncoder, path: str | Path) -> Path:
    """Draw the ViT paper's position-embedding figure; return `path`.

    A grid of small maps: the map at (row r, column c) is the cosine similarity between the position
    embedding of patch (r, c) and those of all patches, laid out as the patch grid. For grids wider than
    16 an evenly spaced subsample of 16 x 16 positions gets a map (each map still covers the full grid)."""
    sim = position_similarity(encoder)
    g = encoder.embeddings.grid
    maps = sim.reshape(g, g, g, g)  # (row, col) of the position -> its (g, g) similarity map
    shown = torch.linspace(0, g - 1, min(g, MAX_POSITION_MAPS)).round().long()
    maps = maps[shown][:, shown].reshape(-1, g, g).numpy()
    k = len(shown)
    mosaic = _mosaic(maps, cols=k)

    fig, ax = plt.subplots(figsize=(7, 6.2))
    image = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    _separate_tiles(ax, k, k, g, g)
    # One tick per map, at its centre, labelled with the 1-based patch row/column as in the paper.
    centres = np.arange(k) * g + (g - 1) / 2
    labels = [str(i + 1) for i in shown.tolist()]
    ax.set_xticks(centres, labels, fontsize=7)
    ax.set_yticks(centres, labels, fontsize=7)
    ax.tick_params(length=0)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    for side in ax.spines.values():
        side.set_visible(False)
    subsample = f", {k}x{k} of them shown" if k < g else ""
    ax.set_title(f"Position-embedding similarity ({g}x{g} patches{subsample})")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity")
    return _save(fig, path)


def _attention_weights(
    encoder: SiglipVisionEncoder, pixel_values: torch.Tensor, interpolate_pos_encoding: bool
) -> tuple[torch.Tensor, str]:
    """Attention over the patches of one image as a distribution (sums to 1): (rows, cols) float32, and
    a short description of where it comes from."""
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.unsqueeze(0)
    if pixel_values.shape[0] != 1:
        raise ValueError(f"attention_map takes one image, got a batch of {pixel_values.shape[0]}")
    param = next(encoder.parameters())
    was_training = encoder.training
    encoder.eval()  # attention dropout would make the picture random
    try:
        with torch.no_grad():
            out = encoder(
                pixel_values.to(param.device, param.dtype),
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=True,
            )
    finally:
        encoder.train(was_training)
    if out.head_attentions is not None:
        weights = out.head_attentions[0].float().mean(0)  # (heads, N) -> (N,)
        source = "pooling head's probe, mean over heads"
    else:
        # No CLS token and no head: average what every query gives each key, "how much each patch is
        # attended to". Each row sums to 1, so the mean over queries does too.
        weights = out.attentions[-1][0].float().mean(dim=(0, 1))  # (heads, N, N) -> (N,)
        source = "last layer, mean over heads and queries"
    patch = encoder.config.patch_size
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    return weights.reshape(rows, cols).cpu(), source


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant tensor (no contrast) becomes zeros instead of NaN."""
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


def attention_map(
    encoder: SiglipVisionEncoder, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
) -> torch.Tensor:
    """Where the model looks in one image: a (H // patch, W // patch) float32 map, min-max scaled to [0, 1].

    `pixel_values` is (1, 3, H, W) or (3, H, W), preprocessed as `vlm.processing` does. With a pooling
    head (SigLIP's default) the map is the head probe's attention over the patches, averaged over heads:
    exactly the weights that make the pooled embedding. Without a head it is the last layer's attention,
    averaged over heads and over all query patches (SigLIP has no CLS token to read a row from), i.e. how
    much each patch is attended to. Non-square images need `interpolate_pos_encoding=True`, as in the
    encoder's forward. A map with no contrast at all comes back as zeros."""
    weights, _ = _attention_weights(encoder, pixel_values, interpolate_pos_encoding)
    return _min_max(weights)


def patch_similarity(
    encoder: SiglipVisionEncoder,
    pixel_values: torch.Tensor,
    row: int,
    col: int,
    interpolate_pos_encoding: bool = False,
) -> torch.Tensor:
    """How alike patch (row, col) of one image is to every patch after the last layer: the cosine similarity
    of their output embeddings (`last_hidden_state`), a (H // patch, W // patch) float32 map, 1 at (row, col).

    `pixel_values` as for `attention_map`. Trained towers give patches of one object similar embeddings;
    a random one mostly the patch itself."""
    if pixel_values.ndim == 3:
        pixel_values = pixel_values.unsqueeze(0)
    patch = encoder.config.patch_size
    rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    if pixel_values.shape[0] != 1 or not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(
            f"patch_similarity takes one image and a patch of its {rows}x{cols} grid, got {row, col}"
        )
    param = next(encoder.parameters())
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(
                pixel_values.to(param.device, param.dtype), interpolate_pos_encoding=interpolate_pos_encoding
            )
    finally:
        encoder.train(was_training)
    hidden = F.normalize(out.last_hidden_state[0].float(), dim=-1)  # (N, D), unit rows
    return (hidden @ hidden[row * cols + col]).reshape(rows, cols).cpu()


def overlay(
    image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, mark: tuple[int, int] | None = None
) -> Image.Image:
    """`image` blended with a (rows, cols) map such as `attention_map`'s: min-max scaled, upsampled bilinearly
    to the image's size (patch blocks would distract from the shape) and coloured with jet, `alpha` of it over
    the image. `mark` = (row, col) outlines that cell of the map, e.g. the query patch of `patch_similarity`."""
    width, height = image.size
    shown = np.asarray(image.convert("RGB"), np.float32) / 255  # (H, W, 3)
    heat_px = F.interpolate(
        _min_max(heat.detach().float().cpu())[None, None],
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    colours = plt.get_cmap("jet")(heat_px[0, 0].clamp(0, 1).numpy())[..., :3]  # (H, W, 3)
    blended = Image.fromarray(np.uint8(np.rint(255 * ((1 - alpha) * shown + alpha * colours))))
    if mark is not None:
        (row, col), (rows, cols) = mark, heat.shape
        box = (
            col * width / cols,
            row * height / rows,
            (col + 1) * width / cols - 1,
            (row + 1) * height / rows - 1,
        )
        draw = ImageDraw.Draw(blended)
        draw.rectangle(box, outline="black", width=4)  # black under white: visible on any colour
        draw.rectangle(box, outline="white", width=2)
    return blended


def _model_size(encoder: SiglipVisionEncoder, image: Image.Image, keep_aspect: bool) -> tuple[int, int]:
    """(height, width) the image is shown to the model at: the trained square, or with `keep_aspect` about
    the same number of patches in the image's own aspect ratio (each side a multiple of the patch)."""
    size, patch = encoder.config.image_size, encoder.config.patch_size
    if not keep_aspect:
        return size, size
    aspect = image.width / image.height
    rows = max(1, round(size / math.sqrt(aspect) / patch))
    cols = max(1, round(size * math.sqrt(aspect) / patch))
    return rows * patch, cols * patch


def plot_attention(
    encoder: SiglipVisionEncoder,
    image: Image.Image | str | Path,
    path: str | Path,
    interpolate_pos_encoding: bool = False,
) -> Path:
    """Draw the image beside itself overlaid with `attention_map` (upsampled, alpha-blended); return `path`.

    `image` is a PIL image or a file path (anything `vlm.processing.load_image` takes). It is shown as the
    model sees it: resized to the model's square, or with
    `interpolate_pos_encoding=True` to a patch-multiple size of its own aspect ratio. The title gives the
    peak attention as a multiple of uniform attention (1 / patches): near 1x means the model looks
    everywhere alike, as a random-init model does, however contrasted the min-max scaled colours are."""
    # Imported here: only this picture needs image loading and preprocessing.
    from vlm.processing import SiglipImageProcessor, load_image

    image = load_image(image)  # RGB and upright, exactly what the processor will see
    height, width = _model_size(encoder, image, keep_aspect=interpolate_pos_encoding)
    processor = SiglipImageProcessor((height, width))
    pixel_values = processor([image])
    weights, source = _attention_weights(encoder, pixel_values, interpolate_pos_encoding)
    heat = _min_max(weights)
    peak = weights.max().item() * weights.numel()

    # The processor's resize, so each pixel shown is the one the model saw.
    resized = image.resize((width, height), resample=processor.resample, reducing_gap=None)
    shown = np.asarray(resized, dtype=np.float32) / 255
    # Bilinear upsampling of the patch grid to pixels; the patch blocks would distract from the shape.
    heat_px = F.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)
    heat_px = heat_px[0, 0].clamp(0, 1).numpy()
    cmap = plt.get_cmap("jet")
    alpha = 0.5
    overlay = (1 - alpha) * shown + alpha * cmap(heat_px)[..., :3]

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 5 * height / width + 1.2), layout="constrained")
    left.imshow(shown)
    left.set_title(f"input as the model sees it ({width}x{height} px)")
    right.imshow(overlay)
    right.set_title(f"attention over {weights.shape[0]}x{weights.shape[1]} patches")
    for ax in (left, right):
        ax.set_axis_off()
    fig.suptitle(f"Attention: {source}; peak {peak:.1f}x uniform")
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(
        mappable,
        ax=[left, right],
        location="bottom",
        shrink=0.4,
        aspect=30,
        label="attention (min-max scaled)",
    )
    return _save(fig, path)


def write_visualisations(
    encoder: SiglipVisionEncoder,
    out_dir: str | Path,
    image: Image.Image | str | Path | None = None,
    prefix: str = "",
) -> list[Path]:
    """Write the patch-filter and position-similarity PNGs, plus the attention PNG when an image is given.

    Files are `{prefix}_patch_filters.png`, `{prefix}_position_similarity.png`, `{prefix}_attention.png`
    (no underscore without a prefix), so `prefix="random"` and `prefix="trained"` can share a folder.
    Returns the written paths in that order."""
    out_dir = Path(out_dir)
    stem = f"{prefix.rstrip('_-')}_" if prefix else ""
    paths = [
        plot_patch_filters(encoder, out_dir / f"{stem}{FILTERS_PNG}"),
        plot_position_similarity(encoder, out_dir / f"{stem}{POSITIONS_PNG}"),
    ]
    if image is not None:
        paths.append(plot_attention(encoder, image, out_dir / f"{stem}{ATTENTION_PNG}"))
    return paths
