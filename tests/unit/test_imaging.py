"""Image decoding, encoding and seeds, with real images: every case encodes and decodes actual bytes."""

from __future__ import annotations

import base64
import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable

import pytest
from PIL import Image, PngImagePlugin

from diffusers_api.errors import InvalidImage, InvalidInputs
from diffusers_api.imaging import (
    IMAGE_FORMATS,
    decode_image,
    decode_mask,
    draw_seed,
    encode_image,
    image_seeds,
    mime_type,
    to_base64,
)

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 4096 * 4096}
WHITE = (255, 255, 255)
LEFT, RIGHT = (8, 8), (24, 8)  # centres of the two halves of a 32x16 test image


# --- helpers ----------------------------------------------------------------------------------------------


def two_halves(mode: str, left: object, right: object) -> Image.Image:
    """A 32x16 image whose left and right halves are flat colours, so even JPEG keeps them nearly exact."""
    image = Image.new(mode, (32, 16), left)  # type: ignore[arg-type]
    image.paste(right, (16, 0, 32, 16))  # type: ignore[arg-type]
    return image


def palette_halves() -> Image.Image:
    image = Image.new("P", (32, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, index 1 blue
    image.paste(1, (16, 0, 32, 16))
    return image


def saved(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Seeded random pixels: incompressible enough for quality to matter, and the same on every run."""
    return Image.frombytes("RGB", size, random.Random(str(size)).randbytes(size[0] * size[1] * 3))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_chunk_types(data: bytes) -> list[bytes]:
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        types.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return types


def black_bilevel_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A real 1-bit PNG, compressed in batches of rows: 20000x20000 is 50 KB, not the 400 MB it decodes to."""
    if idat is None:
        row = bytes(1 + (width + 7) // 8)  # filter type 0, then all-black pixels
        compressor, batch = zlib.compressobj(), max(1, 1_000_000 // len(row))
        chunks = (compressor.compress(row * min(batch, height - done)) for done in range(0, height, batch))
        idat = b"".join(chunks) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    ihdr, body, end = png_chunk(b"IHDR", header), png_chunk(b"IDAT", idat), png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + ihdr + body + end


# --- round trips ------------------------------------------------------------------------------------------

# mode -> (image, expected RGB on the left, expected RGB on the right); transparency decodes as white.
SAMPLES: dict[str, Callable[[], tuple[Image.Image, tuple[int, ...], tuple[int, ...]]]] = {
    "RGB": lambda: (two_halves("RGB", (200, 40, 90), (20, 180, 60)), (200, 40, 90), (20, 180, 60)),
    "RGBA": lambda: (two_halves("RGBA", (200, 40, 90, 255), (20, 180, 60, 0)), (200, 40, 90), WHITE),
    "L": lambda: (two_halves("L", 50, 200), (50, 50, 50), (200, 200, 200)),
    "P": lambda: (palette_halves(), (255, 0, 0), (0, 0, 255)),
}
TOLERANCE = {"PNG": 0, "JPEG": 8, "WEBP": 8, "JXL": 8}


@pytest.mark.parametrize("mode", SAMPLES)
@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_round_trip_decodes_to_rgb_with_the_same_pixels(fmt: str, mode: str) -> None:
    image, left, right = SAMPLES[mode]()

    decoded = decode_image(to_base64(encode_image(image, fmt)), "image", **LIMITS)

    assert (decoded.mode, decoded.size) == ("RGB", (32, 16))
    assert close_to(decoded.getpixel(LEFT), left, TOLERANCE[fmt])
    assert close_to(decoded.getpixel(RIGHT), right, TOLERANCE[fmt])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_jpeg_of_an_image_with_alpha_or_palette_is_written_as_rgb(mode: str) -> None:
    image = two_halves("RGBA", (200, 40, 90, 255), (20, 180, 60, 0)).convert(mode)

    with Image.open(io.BytesIO(encode_image(image, "JPEG"))) as written:
        assert (written.format, written.mode) == ("JPEG", "RGB")


def test_mask_decodes_to_single_channel() -> None:
    mask = two_halves("RGB", (0, 0, 0), (255, 255, 255))

    decoded = decode_mask(to_base64(encode_image(mask)), "mask_image", **LIMITS)

    assert decoded.mode == "L"
    assert (decoded.getpixel(LEFT), decoded.getpixel(RIGHT)) == (0, 255)


# Inputs in modes the encoders never produce: each must still come out as sensible RGB.
DECODED_MODES = {
    "16-bit-grey-png": (saved(Image.new("I;16", (8, 8), 40000), "PNG"), (156, 156, 156), 0),
    "1-bit-png": (saved(Image.new("1", (8, 8), 1), "PNG"), WHITE, 0),
    "la-png-transparent": (saved(Image.new("LA", (8, 8), (0, 0)), "PNG"), WHITE, 0),
    "cmyk-jpeg": (saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), (255, 0, 0), 8),
    "gif": (saved(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"), "GIF"), (0, 0, 255), 0),
    "bmp": (saved(Image.new("RGB", (8, 8), (10, 20, 30)), "BMP"), (10, 20, 30), 0),
}


@pytest.mark.parametrize(("data", "expected", "tolerance"), DECODED_MODES.values(), ids=DECODED_MODES)
def test_other_modes_decode_to_rgb(data: bytes, expected: tuple[int, ...], tolerance: int) -> None:
    decoded = decode_image(b64(data), "image", **LIMITS)

    assert decoded.mode == "RGB"
    assert close_to(decoded.getpixel((4, 4)), expected, tolerance)


def test_palette_transparency_decodes_as_white() -> None:
    image = palette_halves()
    data = saved(image, "PNG", transparency=bytes([255, 0]))  # index 1 (blue) fully transparent

    decoded = decode_image(b64(data), "image", **LIMITS)

    assert (decoded.getpixel(LEFT), decoded.getpixel(RIGHT)) == ((255, 0, 0), WHITE)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    # Stored 32 wide and 16 tall, red left and blue right; orientation 6 says "rotate 90° clockwise to view".
    image = two_halves("RGB", (255, 0, 0), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6

    decoded = decode_image(b64(saved(image, fmt, exif=exif.tobytes())), "image", **LIMITS)

    assert decoded.size == (16, 32)
    assert close_to(decoded.getpixel((8, 8)), (255, 0, 0), 8)
    assert close_to(decoded.getpixel((8, 24)), (0, 0, 255), 8)


# --- base64 variants --------------------------------------------------------------------------------------


def padded_payload() -> bytes:
    """A PNG whose length is not a multiple of 3, so that its base64 ends in padding."""
    plain = saved(noise((20, 20)), "PNG")
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("Comment", "xy")  # a 22-byte chunk: shifts the length by 1 modulo 3
    return plain if len(plain) % 3 else saved(noise((20, 20)), "PNG", pnginfo=metadata)


PAYLOAD = padded_payload()
STANDARD = b64(PAYLOAD)

VARIANTS: dict[str, str] = {
    "standard": STANDARD,
    "padding-stripped": STANDARD.rstrip("="),
    "urlsafe": base64.urlsafe_b64encode(PAYLOAD).decode(),
    "urlsafe-unpadded": base64.urlsafe_b64encode(PAYLOAD).decode().rstrip("="),
    "wrapped-at-76": base64.encodebytes(PAYLOAD).decode(),
    "crlf-and-spaces": "  " + "\r\n ".join(STANDARD[i : i + 60] for i in range(0, len(STANDARD), 60)) + "\n",
    "data-uri": "data:image/png;base64," + STANDARD,
    "data-uri-without-media-type": "data:;base64," + STANDARD,
    "data-uri-wrong-media-type": "data:image/jpeg;base64," + STANDARD,
    "data-uri-upper-case": "DATA:image/png;BASE64," + STANDARD,
}


def test_payload_exercises_padding_and_the_urlsafe_alphabet() -> None:
    # Otherwise the padding and urlsafe variants would test nothing.
    assert STANDARD.endswith("=")
    assert "+" in STANDARD
    assert "/" in STANDARD


@pytest.mark.parametrize("value", VARIANTS.values(), ids=VARIANTS)
def test_base64_variants_decode_to_the_same_image(value: str) -> None:
    expected = decode_image(STANDARD, "image", **LIMITS)

    decoded = decode_image(value, "image", **LIMITS)

    assert decoded.tobytes() == expected.tobytes()


def test_max_bytes_is_the_exact_decoded_size() -> None:
    unpadded_urlsafe = VARIANTS["urlsafe-unpadded"]

    decode_image(unpadded_urlsafe, "image", max_bytes=len(PAYLOAD), max_pixels=LIMITS["max_pixels"])
    with pytest.raises(InvalidImage, match="too large"):
        decode_image(unpadded_urlsafe, "image", max_bytes=len(PAYLOAD) - 1, max_pixels=LIMITS["max_pixels"])


# --- bad inputs -------------------------------------------------------------------------------------------

TRUNCATED_PNG = saved(noise(), "PNG")[:3000]

# id -> (value, max_pixels, what the reason must say)
BAD_INPUTS: dict[str, tuple[object, int, str]] = {
    "empty": ("", LIMITS["max_pixels"], "empty"),
    "only-whitespace": (" \n\t ", LIMITS["max_pixels"], "empty"),
    "empty-data-uri": ("data:image/png;base64,", LIMITS["max_pixels"], "empty"),
    "not-a-string": (None, LIMITS["max_pixels"], "expected a base64 string"),
    "garbage-text": ("this is not an image!", LIMITS["max_pixels"], "not valid base64"),
    "non-ascii": ("iVBORw0KGgo\u00e9", LIMITS["max_pixels"], "not valid base64"),
    "impossible-length": ("AAAAA", LIMITS["max_pixels"], "not valid base64"),
    "percent-encoded-data-uri": ("data:image/png,%89PNG", LIMITS["max_pixels"], "data URI must be base64"),
    "base64-of-text": (b64(b"hello, this is plain text"), LIMITS["max_pixels"], "cannot identify image file"),
    "truncated-png": (b64(TRUNCATED_PNG), LIMITS["max_pixels"], "not a valid image"),
    "png-header-only": (b64(saved(noise(), "PNG")[:40]), LIMITS["max_pixels"], "not a valid image"),
    "eps-is-not-opened": (
        b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
        10**6,
        "cannot identify",
    ),
    "zero-width": (b64(black_bilevel_png(0, 10)), LIMITS["max_pixels"], "not a valid image"),
    "over-max-pixels": (b64(black_bilevel_png(8000, 8000)), LIMITS["max_pixels"], "too many pixels"),
    # Undecodable pixel data still fails on size: the header is checked before any pixel is decoded.
    "over-max-pixels-checked-first": (b64(black_bilevel_png(8000, 8000, b"junk")), 10**6, "too many pixels"),
    "pillow-bomb-warning": (b64(black_bilevel_png(10_000, 10_000)), 10**9, "decompression bomb"),
    "pillow-bomb-error": (b64(black_bilevel_png(20_000, 20_000)), 10**9, "decompression bomb"),
}


@pytest.mark.parametrize(("value", "max_pixels", "reason"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_input_is_an_invalid_image_naming_the_field(value: str, max_pixels: int, reason: str) -> None:
    with pytest.raises(InvalidImage) as caught:
        decode_image(value, "init_image", max_bytes=LIMITS["max_bytes"], max_pixels=max_pixels)

    assert caught.value.message.startswith("init_image: ")
    assert reason in caught.value.message
    assert caught.value.to_wire()["field"] == "init_image"
    assert caught.value.code == "INVALID_INPUTS"


def test_pillow_bomb_warning_is_refused_even_where_warnings_are_ignored() -> None:
    # As in production, where a warning would otherwise be logged and the 100-megapixel image decoded.
    bomb = b64(black_bilevel_png(10_000, 10_000))

    with warnings.catch_warnings(action="ignore"), pytest.raises(InvalidImage, match="decompression bomb"):
        decode_image(bomb, "image", max_bytes=LIMITS["max_bytes"], max_pixels=10**9)


def test_bad_mask_names_the_mask_field() -> None:
    with pytest.raises(InvalidImage, match=r"^mask_image: "):
        decode_mask(b64(TRUNCATED_PNG), "mask_image", **LIMITS)


def test_bilevel_png_helper_makes_a_real_image() -> None:
    decoded = decode_image(b64(black_bilevel_png(64, 32)), "image", **LIMITS)

    assert decoded.size == (64, 32)
    assert decoded.getextrema() == ((0, 0), (0, 0), (0, 0))


# --- encoding ---------------------------------------------------------------------------------------------


def test_png_is_deterministic_and_carries_no_metadata() -> None:
    metadata = PngImagePlugin.PngInfo()
    metadata.add_text("Software", "some editor")
    source = saved(noise(), "PNG", pnginfo=metadata)
    image = decode_image(b64(source), "image", **LIMITS)

    first, second = encode_image(image), encode_image(image.copy())

    assert first == second
    assert b"tEXt" in png_chunk_types(source)
    assert set(png_chunk_types(first)) == {b"IHDR", b"IDAT", b"IEND"}


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_quality_changes_size(fmt: str) -> None:
    image = noise((128, 128))

    low, high = encode_image(image, fmt, quality=10), encode_image(image, fmt, quality=95)

    assert len(low) < len(high)


@pytest.mark.parametrize(("fmt", "default"), [("JPEG", 95), ("WEBP", 90)])
def test_default_quality(fmt: str, default: int) -> None:
    image = noise()

    assert encode_image(image, fmt) == encode_image(image, fmt, quality=default)


def test_png_ignores_quality() -> None:
    image = noise()

    assert encode_image(image, "PNG", quality=500) == encode_image(image, "PNG")


@pytest.mark.parametrize(
    ("name", "fmt", "mime"),
    [
        ("png", "PNG", "image/png"),
        ("JPG", "JPEG", "image/jpeg"),
        ("jpg", "JPEG", "image/jpeg"),
        ("Jpeg", "JPEG", "image/jpeg"),
        ("webp", "WEBP", "image/webp"),
    ],
)
def test_format_names_are_case_insensitive(name: str, fmt: str, mime: str) -> None:
    with Image.open(io.BytesIO(encode_image(noise(), name))) as written:
        assert written.format == fmt
    assert mime_type(name) == mime


@pytest.mark.parametrize("name", ["gif", "bmp", "", "png8"], ids=["gif", "bmp", "empty", "png8"])
def test_unknown_format_names_the_choices(name: str) -> None:
    with pytest.raises(InvalidInputs, match=r"^image_format: .*PNG, JPEG, WEBP"):
        encode_image(noise(), name)
    with pytest.raises(InvalidInputs, match=r"^image_format: "):
        mime_type(name)


@pytest.mark.parametrize(
    "quality", [0, 101, -5, True, 9.5, "90"], ids=["zero", "101", "negative", "bool", "float", "string"]
)
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_quality_out_of_range(fmt: str, quality: object) -> None:
    with pytest.raises(InvalidInputs, match=r"^image_quality: "):
        encode_image(noise(), fmt, quality=quality)


@pytest.mark.parametrize("quality", [1, 100])
def test_quality_bounds_are_accepted(quality: int) -> None:
    assert encode_image(noise(), "JPEG", quality=quality)[:2] == b"\xff\xd8"


def test_to_base64_is_standard_padded_base64() -> None:
    assert to_base64(b"\xfb\xff") == "+/8="


# --- seeds ------------------------------------------------------------------------------------------------


def test_seeds_are_consecutive_one_per_image() -> None:
    assert image_seeds(42, 4) == [42, 43, 44, 45]
    assert image_seeds(42, 1) == [42]


def test_seeds_are_deterministic() -> None:
    assert image_seeds(1234, 3) == image_seeds(1234, 3)


def test_seeds_are_drawn_when_none() -> None:
    drawn = [image_seeds(None, 3) for _ in range(5)]

    for seeds in drawn:
        assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
        assert 0 <= seeds[0] < 2**32
    assert len({seeds[0] for seeds in drawn}) > 1


def test_drawn_seeds_fit_32_bits() -> None:
    seeds = [draw_seed() for _ in range(200)]

    assert all(isinstance(seed, int) and 0 <= seed < 2**32 for seed in seeds)
    assert len(set(seeds)) > 190


def test_seeds_wrap_instead_of_overflowing() -> None:
    assert image_seeds(2**63 - 2, 3) == [2**63 - 2, 2**63 - 1, 0]


@pytest.mark.parametrize("seed", [-1, 2**63, True, "42", 1.5], ids=["negative", "2**63", "bool", "string", "float"])
def test_invalid_seed_names_seed(seed: object) -> None:
    with pytest.raises(InvalidInputs, match=r"^seed: "):
        image_seeds(seed, 1)


@pytest.mark.parametrize("count", [0, -1])
def test_image_count_must_be_positive(count: int) -> None:
    with pytest.raises(InvalidInputs, match="at least 1"):
        image_seeds(1, count)


def test_jxl_is_written_and_read_with_its_plugin() -> None:
    data = encode_image(two_halves("RGB", (200, 40, 90), (20, 180, 60)), "jxl", quality=95)
    with Image.open(io.BytesIO(data)) as written:
        assert written.format == "JXL"
    assert mime_type("JXL") == "image/jxl"


def test_without_its_plugin_jxl_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    jxl = encode_image(two_halves("RGB", (200, 40, 90), (20, 180, 60)), "JXL")
    real_import = builtins.__import__

    def no_plugin(name: str, *args: object, **kwargs: object) -> object:
        if name == "pillow_jxl":
            raise ImportError("No module named 'pillow_jxl'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_plugin)
    with pytest.raises(InvalidInputs, match=r"JXL needs pillow-jxl-plugin.*choose PNG, JPEG or WEBP"):
        encode_image(two_halves("RGB", 0, 1), "JXL")
    with pytest.raises(InvalidImage, match="JPEG XL image, which this server cannot read"):
        decode_image(to_base64(jxl), "image", **LIMITS)
