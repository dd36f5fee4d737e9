"""Images -> pixel tensors: robust loading of any image file or PIL mode, and SigLIP preprocessing.

References
- Hugging Face `transformers` `SiglipImageProcessorPil` (5.x; what `SiglipImageProcessor` resolves to without
  torchvision): convert to RGB compositing transparency onto white, PIL bicubic resize to a fixed square
  (`reducing_gap=None`), rescale by 1/255 in float64, cast to float32, normalise with mean = std = 0.5.
  `SiglipImageProcessor` here is tested against it to the bit on real photos.
- nanoVLM's processors (huggingface/nanoVLM data/processors.py, data/custom_transforms.py): torchvision's
  Resize / DynamicResize on the PIL image, ToTensor ([0, 1], no normalisation), tiles (`ImageProcessing`).

Deliberate deviations from the reference (all in `load_image`, before the shared pipeline)
- EXIF orientation is applied, so a phone photo stored sideways comes out upright.
- High-bit-depth modes are scaled by their real range: `I;16` is divided by 257, where PIL's `convert("RGB")`
  (and so the reference) clips at 255 and turns most of a 16-bit image white. See `_to_8bit`.
- Premultiplied alpha (`RGBa`, `La`) and palettes with an alpha palette count as transparency too, and are
  composited onto white like `RGBA`; the reference only looks for an "A" band.
- Every failure (missing, empty, not an image, truncated, too large, zero size) is one `ImageLoadError`
  naming the file, never a bare PIL traceback.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = str | Path | Image.Image | bytes | bytearray

# 64 megapixels: a 8000 x 8000 photo passes, while a hostile header cannot make us allocate gigabytes.
# Below Pillow's own warning threshold (`Image.MAX_IMAGE_PIXELS`, about 89 megapixels).
DEFAULT_MAX_PIXELS = 64_000_000

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_PIL_IMAGE_NAME = "<PIL image>"
_BYTES_NAME = "<bytes>"


class ImageLoadError(ValueError):
    """An image that cannot be used: `str(err)` is "<name>: <reason>".

    `name` is the path, or "<PIL image>" / "<bytes>" for in-memory input; `reason` says what is wrong in
    plain words (kept separate so a caller can print its own report)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load one image as an upright, fully decoded RGB `PIL.Image.Image`.

    `source` is a file path, encoded file bytes, or a PIL image (any mode; it is not modified). EXIF
    orientation is applied; transparency is composited onto white; 16-bit and float images are scaled
    by their range (see `_to_8bit`). An image of more than `max_pixels` pixels is refused from its header,
    before any decoding; Pillow's own guard (`PIL.Image.MAX_IMAGE_PIXELS`) applies as well.

    Raises `ImageLoadError` naming the file for anything unreadable."""
    return _load(source, _source_name(source), max_pixels)


class LoadedImages(NamedTuple):
    """Result of `load_images`: the good images with their names, and (name, reason) for each failure."""

    images: list[Image.Image]
    names: list[str]
    failures: list[tuple[str, str]]


def load_images(
    sources: Iterable[ImageSource],
    on_error: Literal["raise", "skip"] = "raise",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImages:
    """Load many images with `load_image`, in order.

    With `on_error="skip"` an unreadable image is left out and reported in `failures` as (name, reason)
    instead of raising. Names are paths, or "<PIL image #i>" / "<bytes #i>" (i = position in `sources`)
    so in-memory inputs can be told apart."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    result = LoadedImages([], [], [])
    for i, source in enumerate(sources):
        name = _source_name(source)
        if not isinstance(source, (str, Path)):
            name = f"{name[:-1]} #{i}>"  # "<bytes>" -> "<bytes #3>"
        try:
            image = _load(source, name, max_pixels)
        except ImageLoadError as err:
            if on_error == "raise":
                raise
            result.failures.append((err.name, err.reason))
            continue
        result.images.append(image)
        result.names.append(name)
    return result


def iter_image_files(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """Expand `paths` into a list of image files, in the order given.

    A directory is searched recursively for files with a common image extension (`IMAGE_EXTENSIONS`,
    case-insensitive), sorted, skipping hidden files and folders (".ipynb_checkpoints", macOS "._x.jpg").
    Anything else is kept as named, whatever its extension and even if it does not exist: the user asked
    for it, so `load_image` should say what is wrong with it rather than drop it silently."""
    if isinstance(paths, (str, Path)):  # a bare string is a Sequence too, of characters
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        found = [
            f
            for f in path.rglob("*")
            if f.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in f.relative_to(path).parts)
            and f.is_file()
        ]
        files.extend(sorted(found))
    return files


@dataclass(frozen=True)
class ImageProcessing:
    """How a model's images become pixels, beyond the tower's input size: what a checkpoint's processor config
    says (`VLMConfig.image_processing`). The defaults are SigLIP's own preprocessing.

    `longest_edge` and `image_splitting` are Idefics3's scheme (SmolVLM's processor, `tiling="idefics3"`): the
    image is first resized so that its longest edge is `longest_edge` (aspect kept, the other side rounded up to
    even), then either squashed to one square tile (no splitting), or resized up to whole tiles and cut into
    rows x cols tiles read row by row, followed by the whole image squashed to one more tile (the "global" image).

    `tiling="nanovlm"` is nanoVLM's (data/custom_transforms.py: DynamicResize, GlobalAndSplitImages): one resize
    so that the longer side is a whole number of tiles, at most `longest_edge` (`resize_to_longest_edge`: exactly
    `longest_edge`, their resize_to_max_side_len), and the shorter side the same scale rounded up to whole tiles;
    then rows x cols tiles read row by row, preceded, when `global_image` and there is more than one tile, by the
    whole image shrunk to one tile as torchvision shrinks a tensor (bilinear, antialiased, on [0, 1] pixels)."""

    resample: int = Image.Resampling.BICUBIC
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    longest_edge: int | None = None
    image_splitting: bool = False
    tiling: Literal["idefics3", "nanovlm"] = "idefics3"
    global_image: bool = True  # a split image gets a tile of the whole too (nanoVLM: some checkpoints)
    resize_to_longest_edge: bool = False  # nanovlm tiling: the longer side always to longest_edge

    def __post_init__(self) -> None:
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"resample must be a PIL resampling filter (0-5), got {self.resample}")
        if self.longest_edge is not None and self.longest_edge < 1:
            raise ValueError(f"longest_edge must be >= 1, got {self.longest_edge}")
        if self.image_splitting and self.longest_edge is None:
            raise ValueError("image_splitting needs longest_edge (the size the image is first resized to)")
        if self.tiling not in ("idefics3", "nanovlm"):
            raise ValueError(f"tiling must be 'idefics3' or 'nanovlm', got {self.tiling!r}")
        if self.tiling == "nanovlm" and not self.image_splitting:
            raise ValueError("tiling 'nanovlm' cuts tiles: it needs image_splitting")
        if self.tiling == "idefics3" and (not self.global_image or self.resize_to_longest_edge):
            raise ValueError("global_image false and resize_to_longest_edge are options of tiling 'nanovlm'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Tiles(NamedTuple):
    """One image as the tower sees it: (n, 3, S, S) pixels, and its tile grid: (0, 0) when it is one tile, not
    split; else rows x cols tiles, with Idefics3's tiling followed by the global image (n = rows * cols + 1), with
    nanoVLM's preceded by it when there is one (n = rows * cols + 1, or rows * cols; (1, 1) has none)."""

    pixels: torch.Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class SiglipImageProcessor:
    """SigLIP preprocessing: image(s) -> float32 pixel values, equal to `transformers`' PIL path.

    Each image is loaded with `load_image` (RGB, upright), resized to `image_size` (an int for a square, or
    (height, width)) with `resample` and no `reducing_gap`, scaled to [0, 1] and normalised per channel:
    (x - mean) / std, which with the SigLIP default of 0.5 maps pixels to [-1, 1].

    With `longest_edge` (and `splitting`) it is Idefics3's image processor instead (`ImageProcessing`), equal to
    `transformers`' `Idefics3ImageProcessorPil`, or with `tiling="nanovlm"` nanoVLM's: one image may then be
    several tiles (`tiles`)."""

    image_size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC
    max_pixels: int = DEFAULT_MAX_PIXELS
    longest_edge: int | None = None
    splitting: bool = False
    tiling: Literal["idefics3", "nanovlm"] = "idefics3"  # see `ImageProcessing`
    global_image: bool = True
    resize_to_longest_edge: bool = False

    def __post_init__(self) -> None:
        height, width = self.size
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {self.mean} and {self.std}")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        if self.longest_edge is not None and height != width:
            raise ValueError(
                f"Idefics3's scheme cuts square tiles; image_size {self.image_size} is not square"
            )
        if self.tiling == "nanovlm" and (self.longest_edge is None or self.longest_edge % height):
            raise ValueError(
                f"nanoVLM's tiling needs a longest_edge that is a whole number of {height}-px tiles, got "
                f"{self.longest_edge}"
            )

    @classmethod
    def of(cls, image_size: int, processing: ImageProcessing) -> SiglipImageProcessor:
        """The processor of a model whose tower reads `image_size` squares."""
        return cls(
            image_size, processing.image_mean, processing.image_std, processing.resample,
            longest_edge=processing.longest_edge, splitting=processing.image_splitting, tiling=processing.tiling,
            global_image=processing.global_image, resize_to_longest_edge=processing.resize_to_longest_edge,
        )  # fmt: skip

    @property
    def size(self) -> tuple[int, int]:
        """Output (height, width)."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        height, width = self.image_size
        return int(height), int(width)

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """One image -> (3, H, W) float32 (one tile: without image splitting)."""
        if self.splitting:
            raise ValueError("with image splitting an image is several tiles: use `tiles`")
        return self.tiles(image).pixels[0]

    def tiles(self, image: ImageSource) -> Tiles:
        """One image -> its tiles' pixels (n, 3, H, W) float32 and its tile grid."""
        rgb = load_image(image, self.max_pixels)
        if self.longest_edge is None:
            return Tiles(self._normalise([self._resize(rgb, self.size)]), (0, 0))
        if self.tiling == "nanovlm":
            return self._nanovlm_tiles(rgb)
        # Idefics3: every resize is from the uint8 image, as transformers' PIL backend does.
        rgb = self._resize(rgb, _longest_edge_size(rgb.height, rgb.width, self.longest_edge))
        tile = self.size[0]
        if not self.splitting:
            return Tiles(self._normalise([self._resize(rgb, (tile, tile))]), (0, 0))
        rgb = self._resize(rgb, _whole_tiles_size(rgb.height, rgb.width, tile))
        rows, cols = rgb.height // tile, rgb.width // tile
        if rows == cols == 1:  # one tile is the whole image: no global copy
            return Tiles(self._normalise([rgb]), (0, 0))
        crops = [
            rgb.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows)
            for c in range(cols)
        ]
        return Tiles(self._normalise([*crops, self._resize(rgb, (tile, tile))]), (rows, cols))

    def _nanovlm_tiles(self, rgb: Image.Image) -> Tiles:
        """nanoVLM's DynamicResize, ToTensor and GlobalAndSplitImages (see `ImageProcessing`)."""
        tile = self.size[0]
        rgb = self._resize(
            rgb, _nanovlm_size(rgb.height, rgb.width, tile, self.longest_edge, self.resize_to_longest_edge)
        )
        rows, cols = rgb.height // tile, rgb.width // tile
        crops = [
            rgb.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows)
            for c in range(cols)
        ]
        pixels = self._normalise(crops)
        if self.global_image and (rows, cols) != (1, 1):
            # torchvision's tensor resize: F.interpolate, bilinear, antialiased, on ToTensor's [0, 1] values
            whole = torch.from_numpy(_unit([rgb])).permute(0, 3, 1, 2)  # (1, 3, H, W)
            shrunk = F.interpolate(whole, (tile, tile), mode="bilinear", align_corners=False, antialias=True)
            pixels = torch.cat([self._standardise(shrunk.permute(0, 2, 3, 1).numpy()), pixels])
        return Tiles(pixels, (rows, cols))

    def grid(self, image: ImageSource) -> tuple[int, int]:
        """The tile grid `tiles` gives `image` ((0, 0): one tile), from its size alone when it is not split."""
        return (0, 0) if not self.splitting else self.tiles(image).grid

    def _resize(self, rgb: Image.Image, size: tuple[int, int]) -> Image.Image:
        height, width = size
        return rgb.resize((width, height), resample=self.resample, reducing_gap=None)

    def _normalise(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """uint8 RGB images of one size -> (n, 3, H, W) float32."""
        return self._standardise(_unit(images))

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) float32 in [0, 1] -> (x - mean) / std as (n, 3, H, W) float32 (float32 arithmetic, as the
        references; with mean 0 and std 1, nanoVLM's, the values are left exactly as they are)."""
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def __call__(self, images: ImageSource | Sequence[ImageSource]) -> torch.Tensor:
        """One image or a sequence of images (paths, PIL images, encoded bytes) -> (n, 3, H, W) float32: one
        tile per image, or with image splitting each image's tiles in turn."""
        images = image_sequence(images)
        if len(images) == 0:
            return torch.empty(0, 3, *self.size)
        return torch.cat([self.tiles(image).pixels for image in images])


def image_sequence(images: ImageSource | Sequence[ImageSource]) -> Sequence[ImageSource]:
    """One image as a list of one, a sequence as it is: a path is one image, never a string of letters."""
    if isinstance(images, (str, Path, bytes, bytearray, Image.Image)):
        return [images]
    if not isinstance(images, Sequence):
        raise TypeError(
            f"expected an image or a sequence of images (paths, PIL images, bytes), got {type(images).__name__}"
        )
    return images


def _unit(images: Sequence[Image.Image]) -> np.ndarray:
    """uint8 RGB images of one size -> (n, H, W, 3) float32 in [0, 1]. Bit-equal to transformers, which rescales
    in float64 and casts to float32, and to torchvision's ToTensor, which divides in float32: for all 256 uint8
    values both give exactly the float32 quotient."""
    return np.stack([np.asarray(image) for image in images]).astype(np.float32) / 255


def _nanovlm_size(height: int, width: int, tile: int, longest: int, to_longest: bool) -> tuple[int, int]:
    """nanoVLM's DynamicResize._get_new_hw: the longer side up to whole tiles, at most `longest` (`to_longest`:
    exactly `longest`), the shorter one scaled alike and rounded up to whole tiles (at least one)."""
    long, short = (width, height) if width >= height else (height, width)
    target_long = longest if to_longest else min(longest, math.ceil(long / tile) * tile)
    scale = target_long / long
    target_short = max(math.ceil(short * scale / tile) * tile, tile)
    return (target_short, target_long) if width >= height else (target_long, target_short)


# Idefics3's resizing rules (transformers' `Idefics3ImageProcessorPil`), as numbers: the size an image is resized
# to before it is cut.
_MAX_IMAGE_SIDE = 4096  # Idefics3's upper bound on either side after the first resize


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """The longest edge to `longest`, aspect kept (truncated, then up to even), each side at least 1, and both
    within 4096."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height  # the second rule reads the new size's aspect
    if width >= height and width > _MAX_IMAGE_SIDE:
        width, height = _MAX_IMAGE_SIDE, max(int(_MAX_IMAGE_SIDE / aspect), 1)
    elif height > width and height > _MAX_IMAGE_SIDE:
        height, width = _MAX_IMAGE_SIDE, max(int(_MAX_IMAGE_SIDE * aspect), 1)
    return height, width


def _whole_tiles_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Up to whole tiles: the longer side rounded up, the other from the aspect and then rounded up."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


# ---------------------------------------------------------------------------------------------------------
# Loading


def _source_name(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return _PIL_IMAGE_NAME
    if isinstance(source, (bytes, bytearray)):
        return _BYTES_NAME
    raise TypeError(f"an image source is a path, bytes or a PIL image, got {type(source).__name__}")


def _load(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    if isinstance(source, Image.Image):
        # The caller's image: check and decode it, but never close or change it.
        _check_size(source, name, max_pixels)
        _decode(source, name)
        return _to_rgb(_upright(source, name), name)

    image = _open(source, name)
    try:
        _check_size(image, name, max_pixels)  # from the header, before a single pixel is decoded
        _decode(image, name)
        return _to_rgb(_upright(image, name), name)
    finally:
        image.close()  # releases the file handle; the returned image is always a new, loaded one


def _open(source: str | Path | bytes | bytearray, name: str) -> Image.Image:
    """Open (read the header of) a file or encoded bytes, turning every failure into an ImageLoadError."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError(name, "no data (0 bytes)")
        fp: Path | io.BytesIO = io.BytesIO(source)
    else:
        fp = Path(source)
        try:
            stat = fp.stat()
        except FileNotFoundError:
            raise ImageLoadError(name, "no such file") from None
        except OSError as err:
            raise ImageLoadError(name, f"cannot access the file ({err.strerror or err})") from None
        if fp.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        if stat.st_size == 0:
            raise ImageLoadError(name, "file is empty (0 bytes)")
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make the warning an error here so a
        # bomb never gets as far as decoding. (warnings filters are process-wide: the window is one open.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(fp)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageLoadError(
            name,
            f"image is larger than Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,}): {err}",
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image, or in a format Pillow cannot read") from None
    except OSError as err:  # permission denied and the like
        raise ImageLoadError(name, f"cannot read the file ({err.strerror or err})") from None
    except Exception as err:
        # A plugin choking on a malformed header raises anything from SyntaxError to struct.error.
        raise ImageLoadError(name, f"malformed image header ({type(err).__name__}: {err})") from None


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(name, f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"image is {width}x{height} = {width * height:,} pixels, more than max_pixels = {max_pixels:,} "
            "(a possible decompression bomb); pass a larger max_pixels to load it",
        )


def _decode(image: Image.Image, name: str) -> None:
    """Force the full decode now, so a truncated or corrupt file fails here and not later in a resize."""
    try:
        image.load()
    except Exception as err:
        # Decoders raise OSError, SyntaxError, EOFError, ValueError, ... for bad data.
        raise ImageLoadError(
            name, f"image data is truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def _upright(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; always returns a new image (a copy when there is nothing to do)."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as err:
        # Malformed EXIF blocks raise from deep inside the TIFF-tag parser.
        raise ImageLoadError(
            name, f"cannot apply the EXIF orientation ({type(err).__name__}: {err})"
        ) from None
    return upright if upright is not None else image.copy()


# ---------------------------------------------------------------------------------------------------------
# Colour conversion

_INT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency onto white (as `transformers`' `convert_to_rgb`)."""
    if image.mode in _INT16_MODES or image.mode in ("I", "F"):
        image = _to_8bit(image)  # mode L; high-bit-depth images carry no alpha band
    elif image.has_transparency_data:
        # Pillow has no La -> RGBA conversion; it does have La -> LA (un-premultiplying) and RGBa -> RGBA.
        if image.mode == "La":
            image = image.convert("LA")
        # convert("RGBA") also turns a palette or RGB/L "transparency" key into a real alpha band.
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        # 1, L, P, CMYK, YCbCr, LAB (colorimetric, via Pillow's built-in Lab -> sRGB), HSV, RGBX.
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageLoadError(name, f"cannot convert PIL mode {image.mode!r} to RGB ({err})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image -> mode L, scaled by its real range.

    PIL's own `convert("L")` clips at 255, so a 16-bit photo comes out nearly all white. Instead:
    - `I;16*` (16-bit PNG/TIFF): the full 16-bit range maps to 0..255, v / 257 rounded (65535 -> 255).
    - `I` (32-bit int; Pillow's mode for e.g. 16-bit PGM): values within 0..255 are taken as 8-bit data as
      is (e.g. `L.convert("I")`; read as 16-bit they would be black anyway); within 0..65535 as 16-bit
      data, v / 257; any other range is stretched min..max -> 0..255.
    - `F` (32-bit float): values within 0..1 are the float-image convention, v * 255; within 0..255 taken
      as is; anything else (depth maps, HDR) is stretched min..max -> 0..255. NaN -> 0, +-inf clipped.
    A constant image that needs stretching becomes black."""
    values = np.asarray(image).astype(np.float64)  # I;16B arrives big-endian; float64 holds int32 exactly
    if image.mode in _INT16_MODES:
        scaled = values / 257
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if image.mode == "F" and lo >= 0 and hi <= 1:
            scaled = values * 255
        elif lo >= 0 and hi <= 255:
            scaled = values
        elif image.mode == "I" and lo >= 0 and hi <= 65535:
            scaled = values / 257
        elif hi > lo:
            scaled = (values - lo) / (hi - lo) * 255
        else:
            scaled = np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
