"""`vlm.processing`: parity with transformers' SigLIP preprocessing on real photos, every PIL mode, every
error path. Images are scikit-image's bundled samples or written to `tmp_path`; nothing is downloaded."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import (
    SiglipImageProcessorPil,
)  # the reference `SiglipImageProcessor` is without torchvision

from vlm.processing import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    SiglipImageProcessor,
    iter_image_files,
    load_image,
    load_images,
)

SAMPLES = ("astronaut", "chelsea", "coffee", "camera", "rocket")  # camera is greyscale; three are not square


def _sample(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def _reference(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    processor = SiglipImageProcessorPil(size={"height": height, "width": width})
    return processor(images=images, return_tensors="pt")["pixel_values"]


def _exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """PNG signature and IHDR of a 1-bit greyscale image: all a reader needs to know the size."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit greyscale PNG written by hand: a huge size costs kilobytes, not gigabytes."""
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return _png_header(width, height) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("size", [224, 64])
def test_matches_transformers_on_real_photos(size: int) -> None:
    images = [_sample(name) for name in SAMPLES]
    ours = SiglipImageProcessor(size)(images)
    assert ours.shape == (len(SAMPLES), 3, size, size) and ours.dtype == torch.float32
    _exact(ours, _reference(images, size, size))


def test_matches_transformers_at_a_non_square_size() -> None:
    images = [_sample("chelsea"), _sample("camera")]
    ours = SiglipImageProcessor((32, 48))(images)
    assert ours.shape == (2, 3, 32, 48)
    _exact(ours, _reference(images, 32, 48))


def test_path_bytes_and_pil_inputs_agree(tmp_path: Path) -> None:
    image = _sample("coffee")
    path = tmp_path / "coffee.png"
    image.save(path)
    processor = SiglipImageProcessor(64)
    from_pil = processor(image)
    _exact(processor(path), from_pil)
    _exact(processor(str(path)), from_pil)
    _exact(processor(path.read_bytes()), from_pil)
    _exact(processor.preprocess(image), from_pil[0])


def test_processor_api() -> None:
    processor = SiglipImageProcessor(32)
    image = _sample("rocket").convert("RGBA")
    assert processor(image).shape == (1, 3, 32, 32)
    assert processor.preprocess(image).shape == (3, 32, 32)
    assert processor([]).shape == (0, 3, 32, 32)
    assert image.mode == "RGBA" and image.size == (640, 427)  # the caller's image is left alone
    pixels = processor([image, image])
    assert pixels.min() >= -1 and pixels.max() <= 1
    with pytest.raises(TypeError, match="sequence of images"):
        processor(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        SiglipImageProcessor(0)
    with pytest.raises(ValueError, match="3 values"):
        SiglipImageProcessor(32, mean=(0.5,))


# ---------------------------------------------------------------------------------------------------------
# PIL modes


def _photo() -> Image.Image:
    return _sample("astronaut").crop((100, 0, 164, 48))  # 64 x 48, not square, busy colours


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA with the left half fully transparent and a ramp of partial alpha on the right."""
    alpha = np.zeros((image.height, image.width), np.uint8)
    alpha[:, image.width // 2 :] = np.linspace(40, 255, image.width - image.width // 2, dtype=np.uint8)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _palette_with_transparency() -> Image.Image:
    """A P image read back from a PNG whose palette index 0 is transparent (a tRNS chunk)."""
    image = _photo().convert("P")
    pixels = np.array(image)
    pixels[:10, :10] = 0
    image = Image.fromarray(pixels)
    image.putpalette(_photo().convert("P").getpalette())
    return Image.open(io.BytesIO(_encoded(image, "PNG", transparency=0)))


MODE_MAKERS = {
    "RGBA": lambda: _with_alpha(_photo()),
    "LA": lambda: _with_alpha(_photo()).convert("LA"),
    "PA": lambda: _with_alpha(_photo()).convert("P").convert("PA"),
    "P": lambda: _photo().convert("P"),
    "P+transparency": _palette_with_transparency,
    "L": lambda: _photo().convert("L"),
    "1": lambda: _photo().convert("1"),
    "CMYK": lambda: _photo().convert("CMYK"),
    "YCbCr": lambda: _photo().convert("YCbCr"),
    "LAB": lambda: _photo().convert("LAB"),
    "HSV": lambda: _photo().convert("HSV"),
}


@pytest.mark.parametrize("mode", list(MODE_MAKERS))
def test_modes_match_transformers(mode: str) -> None:
    """For the 8-bit modes the reference's convert_to_rgb is right, and we equal it to the bit."""
    image = MODE_MAKERS[mode]()
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    _exact(SiglipImageProcessor(32)(image), _reference([image], 32, 32))


def test_transparent_pixels_come_out_white() -> None:
    photo = _photo()
    rgb = np.asarray(load_image(_with_alpha(photo)))
    assert (rgb[:, : photo.width // 2] == 255).all()
    # Fully opaque pixels keep their colour; partly transparent ones lie between it and white.
    original = np.asarray(photo).astype(int)
    assert (rgb[:, -1] == original[:, -1]).all()
    middle = photo.width * 3 // 4
    assert (rgb[:, middle] >= original[:, middle]).all() and (rgb[:, middle] > original[:, middle]).any()


def test_palette_transparency_comes_out_white() -> None:
    image = _palette_with_transparency()
    assert image.mode == "P" and image.info["transparency"] == 0
    rgb = np.asarray(load_image(image))
    assert (rgb[:10, :10] == 255).all()
    assert not (rgb[20:, 20:] == 255).all()


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_composited_onto_white(mode: str) -> None:
    straight = _with_alpha(_photo())
    if mode == "La":
        straight = straight.convert("LA")
    expected = np.asarray(load_image(straight)).astype(int)
    got = np.asarray(load_image(straight.convert(mode))).astype(int)
    assert (got[:, : straight.width // 2] == 255).all()
    assert np.abs(got - expected).max() <= 2  # premultiplying rounds


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "CMYK"])
def test_colour_spaces_convert_back_to_the_colours(mode: str) -> None:
    photo = _photo()
    back = np.asarray(load_image(photo.convert(mode))).astype(int)
    assert np.abs(back - np.asarray(photo).astype(int)).mean() < 3


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_gradient_spans_the_8_bit_range(mode: str) -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint16) * 257, (8, 1))  # 0 .. 65535
    image = Image.fromarray(ramp.astype(">u2" if mode == "I;16B" else np.uint16))
    assert image.mode == mode
    grey = np.asarray(load_image(image))[..., 0]
    np.testing.assert_array_equal(grey, np.tile(np.arange(256, dtype=np.uint8), (8, 1)))
    # What we avoid: PIL's own conversion clips at 255 and turns almost the whole ramp white.
    assert (np.asarray(image.convert("L")) == 255).mean() > 0.99


def test_16_bit_png_file_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (4, 1))).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    grey = np.asarray(load_image(path))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and 120 <= grey.mean() <= 135


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 100, 255]), [0, 100, 255]),  # 8-bit data in a 32-bit container: as is
        (np.array([0, 257 * 100, 257 * 200]), [0, 100, 200]),  # 16-bit data (e.g. a 16-bit PGM): / 257
        (np.array([-1000, 0, 1000]), [0, 128, 255]),  # anything else: min..max stretch
    ],
)
def test_int32_mode_scaling(values: np.ndarray, expected: list[int]) -> None:
    image = Image.fromarray(values.astype(np.int32)[None])
    assert image.mode == "I"
    assert np.asarray(load_image(image))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0.0, 0.5, 1.0]), [0, 128, 255]),  # the float-image convention, 0..1
        (np.array([0.0, 100.0, 255.0]), [0, 100, 255]),  # 8-bit data as floats
        (np.array([2.0, 1002.0, 2002.0]), [0, 128, 255]),  # e.g. depth in mm: min..max stretch
        (np.array([np.nan, 0.5, 1.0]), [0, 128, 255]),  # NaN is black
    ],
)
def test_float_mode_scaling(values: np.ndarray, expected: list[int]) -> None:
    image = Image.fromarray(values.astype(np.float32)[None])
    assert image.mode == "F"
    assert np.asarray(load_image(image))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("orientation", "red_corner"),
    [(6, "top_right"), (8, "bottom_left")],  # 6: rotate 90 clockwise to view; 8: 90 counter-clockwise
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, red_corner: str) -> None:
    stored = Image.new("RGB", (60, 40), "white")  # as stored: landscape, red block top-left
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    stored.save(path, quality=95, exif=exif)

    with Image.open(path) as opened:
        from_pil = load_image(opened)
    for upright in (load_image(path), from_pil):
        assert upright.size == (40, 60)  # width and height swap
        pixels = np.asarray(upright).astype(int)
        corners = {
            "top_left": pixels[5, 5],
            "top_right": pixels[5, -6],
            "bottom_left": pixels[-6, 5],
            "bottom_right": pixels[-6, -6],
        }
        for corner, (r, g, b) in corners.items():
            is_red = r > 200 and g < 60 and b < 60
            assert is_red == (corner == red_corner), (corner, (r, g, b))


# ---------------------------------------------------------------------------------------------------------
# Errors


def _truncated(fmt: str) -> bytes:
    data = _encoded(_sample("chelsea"), fmt)
    return data[: len(data) // 2]


ERROR_CASES = {
    "missing": (lambda d: d / "nope.png", "no such file"),
    "directory": (lambda d: d, "directory"),
    "empty": (lambda d: _write(d / "empty.png", b""), "empty"),
    "text": (lambda d: _write(d / "notes.jpg", b"just some words, not pixels\n" * 10), "not an image"),
    "truncated png": (lambda d: _write(d / "cut.png", _truncated("PNG")), "truncated or corrupt"),
    "truncated jpeg": (lambda d: _write(d / "cut.jpg", _truncated("JPEG")), "truncated or corrupt"),
    "zero width png": (lambda d: _write(d / "zero.png", _bilevel_png(0, 4)), "not an image"),
    "bomb over default limit": (lambda d: _write(d / "bomb.png", _bilevel_png(8200, 8200)), "max_pixels"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_the_file(tmp_path: Path, case: str) -> None:
    make, reason = ERROR_CASES[case]
    path = make(tmp_path)
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(path)
    err = caught.value
    assert err.name == str(path) and str(err).startswith(f"{path}: ")
    # Our message alone, not a PIL traceback with ours appended.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert isinstance(err, ValueError)


def test_the_hand_written_png_is_a_real_image() -> None:
    """Guards the bomb tests: a size error must come from the size, not from a broken file."""
    image = load_image(_bilevel_png(24, 8))
    assert image.size == (24, 8) and not np.asarray(image).any()
    assert DEFAULT_MAX_PIXELS < 8200 * 8200


def test_max_pixels_is_checked_before_decoding(tmp_path: Path) -> None:
    path = _write(tmp_path / "small.png", _encoded(_sample("camera"), "PNG"))
    with pytest.raises(ImageLoadError, match=r"512x512 = 262,144 pixels, more than max_pixels = 1,000"):
        load_image(path, max_pixels=1000)
    # The header is enough: a file claiming a huge size fails even though its pixel data is cut off.
    header_only = _png_header(9000, 9000) + _png_chunk(b"IDAT", b"")  # 81 Mpx: over ours, under Pillow's
    with pytest.raises(ImageLoadError, match="max_pixels"):
        load_image(header_only)
    assert load_image(path, max_pixels=512 * 512).size == (512, 512)


@pytest.mark.parametrize("side", [10_000, 14_000])  # Pillow warns above ~89 Mpx and refuses above ~179 Mpx
def test_pillows_bomb_guard_becomes_our_error(tmp_path: Path, side: int) -> None:
    path = _write(tmp_path / "bomb.png", _bilevel_png(side, side))
    with pytest.raises(ImageLoadError, match="Pillow's decompression-bomb limit") as caught:
        load_image(path, max_pixels=10**9)
    assert caught.value.name == str(path)


@pytest.mark.parametrize(
    ("source", "name", "reason"),
    [
        (b"", "<bytes>", "no data"),
        (b"not an image at all", "<bytes>", "not an image"),
        (Image.new("RGB", (0, 4)), "<PIL image>", r"zero size \(0x4\)"),
        (Image.new("L", (3, 0)), "<PIL image>", "zero size"),
    ],
)
def test_in_memory_errors(source: object, name: str, reason: str) -> None:
    with pytest.raises(ImageLoadError, match=reason) as caught:
        load_image(source)
    assert caught.value.name == name


def test_lazy_pil_image_with_truncated_data() -> None:
    lazy = Image.open(io.BytesIO(_truncated("JPEG")))  # opening reads the header only
    with pytest.raises(ImageLoadError, match="<PIL image>: image data is truncated"):
        load_image(lazy)


def test_unknown_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="path, bytes or a PIL image"):
        load_image(42)


# ---------------------------------------------------------------------------------------------------------
# Many files


def test_load_images_skips_and_reports(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.png", _encoded(_photo(), "PNG"))
    text = _write(tmp_path / "text.png", b"hello")
    sources = [good, tmp_path / "missing.jpg", text, _photo(), b""]

    loaded = load_images(sources, on_error="skip")
    assert loaded.names == [str(good), "<PIL image #3>"]
    assert [image.size for image in loaded.images] == [(64, 48), (64, 48)]
    assert [name for name, _ in loaded.failures] == [str(tmp_path / "missing.jpg"), str(text), "<bytes #4>"]
    assert [reason for _, reason in loaded.failures] == [
        "no such file",
        "not an image, or in a format Pillow cannot read",
        "no data (0 bytes)",
    ]

    with pytest.raises(ImageLoadError, match="missing.jpg: no such file"):
        load_images(sources)
    with pytest.raises(ValueError, match="on_error"):
        load_images(sources, on_error="ignore")


def test_iter_image_files(tmp_path: Path) -> None:
    for relative in [
        "b.jpg",
        "a.PNG",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "notes.txt",
        ".cache/e.png",
        "._f.jpg",
    ]:
        (tmp_path / "photos" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / relative).write_bytes(b"")
    explicit = tmp_path / "scan.dat"  # named explicitly: kept whatever its extension
    photos = tmp_path / "photos"

    assert iter_image_files([explicit, photos, str(tmp_path / "absent.png")]) == [
        explicit,
        photos / "a.PNG",
        photos / "b.jpg",
        photos / "sub" / "c.webp",
        photos / "sub" / "deeper" / "d.tiff",
        tmp_path / "absent.png",
    ]
    assert iter_image_files(str(photos / "sub")) == [
        photos / "sub" / "c.webp",
        photos / "sub" / "deeper" / "d.tiff",
    ]
