"""Image inputs and outputs on the wire, and the seeds that make outputs reproducible.

Inputs arrive as base64 (or data URIs) from untrusted clients, so decoding is defensive: the byte size and
the pixel count from the header are checked before any pixel is decoded, only common formats are opened
(never EPS, which would run Ghostscript), and every failure becomes an `InvalidImage` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImage, InvalidInputs

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "JXL")

# What clients may send: browsers, phones and image tools. JPEG covers MPO (multi-picture JPEG from cameras).
DECODABLE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# JPEG XL (a bare codestream, or the ISO BMFF container) is opened too where its plugin is installed.
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")

_FORMAT_ALIASES = {"JPG": "JPEG"}
_MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "JXL": "image/jxl"}
_DEFAULT_QUALITY = {"JPEG": 95, "WEBP": 90, "JXL": 90}

# Modes each encoder writes as is; anything else is converted first.
_PNG_MODES = ("1", "L", "LA", "I;16", "I;16B", "P", "RGB", "RGBA")
_JPEG_MODES = ("L", "RGB", "CMYK")
_WEBP_MODES = ("RGB", "RGBA")

# Integer modes that hold 16-bit samples (16-bit PNG/TIFF/PPM grayscale).
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")

# What Pillow raises for malformed data, besides UnidentifiedImageError (an OSError). Its decoders are not
# consistent, so this is the set its own fuzzers accept as "bad input" rather than "bug".
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)

_WHITE = (255, 255, 255, 255)
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
_SEED_LIMIT = 2**63


# --- decoding ---------------------------------------------------------------------------------------------


def decode_image(value: str | bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an image input (base64 or data-URI text, or the bytes of a file) into a fully loaded RGB image
    (alpha composited on white)."""
    data = value if isinstance(value, bytes) else _decode_base64(value, field, max_bytes=max_bytes)
    return _to_rgb(_open_image(data, field, max_pixels=max_pixels))


def decode_mask(value: str | bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Like `decode_image`, but returned as a single-channel "L" mask."""
    return decode_image(value, field, max_bytes=max_bytes, max_pixels=max_pixels).convert("L")


def decode_rgba(value: str | bytes, field: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Like `decode_image`, but keeping transparency: an "RGBA" image (opaque where the file has no alpha)."""
    data = value if isinstance(value, bytes) else _decode_base64(value, field, max_bytes=max_bytes)
    image = _open_image(data, field, max_pixels=max_pixels)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8bit(image)
    return image.convert("RGBA")


def _decode_base64(value: str, field: str, *, max_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidImage(field, f"expected a base64 string, got {type(value).__name__}")
    text = "".join(_strip_data_uri(value, field).split())  # clients wrap base64 at 76 columns
    if not text:
        raise InvalidImage(field, "empty")
    # Accept urlsafe and unpadded base64 by normalising to the standard alphabet with exact padding.
    text = text.translate(_URLSAFE_TO_STANDARD).rstrip("=")
    if len(text) % 4 == 1:
        raise InvalidImage(field, "not valid base64 (bad length)")
    size = len(text) * 3 // 4
    if size > max_bytes:  # refuse before decoding: this is exactly the decoded size
        raise InvalidImage(field, f"too large ({size} bytes, limit {max_bytes})")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise InvalidImage(field, "not valid base64") from None


def _strip_data_uri(value: str, field: str) -> str:
    """Return the payload of "data:[<media type>];base64,<payload>", or `value` if it is not a data URI."""
    if value.lstrip()[:5].lower() != "data:":
        return value
    header, comma, payload = value.partition(",")
    if not comma or not header.lower().rstrip().endswith(";base64"):
        raise InvalidImage(field, "data URI must be base64 encoded (data:image/png;base64,...)")
    # The media type is not trusted: the format is sniffed from the bytes.
    return payload


def _open_image(data: bytes, field: str, *, max_pixels: int) -> Image.Image:
    """Open `data`, check its header size, then decode every pixel so that truncated files fail here."""
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error like the rest. Not
        # thread-local before Python 3.14, but the worst a race can do is leave this same filter installed.
        with (
            warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning),
            Image.open(io.BytesIO(data), formats=_formats(data, field)) as image,
        ):
            _check_dimensions(image, field, max_pixels=max_pixels)
            image.load()
            return ImageOps.exif_transpose(image)  # a new image, so closing the file is safe
    except UnidentifiedImageError:
        raise InvalidImage(field, "not a valid image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(field, f"too many pixels ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise InvalidImage(field, f"not a valid image ({str(exc) or type(exc).__name__})") from exc


def _formats(data: bytes, field: str) -> tuple[str, ...]:
    if not data.startswith(_JXL_SIGNATURES):
        return DECODABLE_FORMATS
    if not _jxl_plugin():
        raise InvalidImage(field, "a JPEG XL image, which this server cannot read (it lacks pillow-jxl-plugin)")
    return ("JXL",)


def _jxl_plugin() -> bool:
    """Whether pillow-jxl-plugin is installed; importing it registers JXL with Pillow."""
    try:
        import pillow_jxl  # noqa: F401
    except ImportError:
        return False
    return True


def _check_dimensions(image: Image.Image, field: str, *, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidImage(field, f"image has zero size ({width}x{height})")
    if width * height > max_pixels:
        pixels = width * height
        raise InvalidImage(field, f"too many pixels ({width}x{height} = {pixels}, limit {max_pixels})")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB: 16-bit scaled to 8, transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8bit(image)
    if image.has_transparency_data:
        return _composite_on_white(image)
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips at 255, which turns most 16-bit images white; scale instead.
    # "I" is taken to hold 16-bit samples too: that is how decoders of the formats above fill it in practice.
    scaled = image.convert("I").point(lambda value: value / 256).convert("L")
    scaled.info.pop("transparency", None)  # a 16-bit colour key means nothing at 8 bits
    return scaled


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


# --- encoding ---------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "PNG", quality: int | None = None) -> bytes:
    """Encode `image` as PNG, JPEG, WEBP or JXL. The same image always gives the same PNG bytes."""
    fmt = check_encodable(fmt)
    buffer = io.BytesIO()
    if fmt == "PNG":
        # No pnginfo, no tIME chunk, fixed zlib settings: nothing that varies from run to run.
        _for_png(image).save(buffer, "PNG")
    elif fmt == "JPEG":
        _for_jpeg(image).save(buffer, "JPEG", quality=_quality(fmt, quality))
    else:  # WEBP and JXL take the same modes
        _for_webp(image).save(buffer, fmt, quality=_quality(fmt, quality))
    return buffer.getvalue()


def check_encodable(fmt: str) -> str:
    """The normalized format name, if this server can write it. JPEG XL needs a Pillow plugin (pillow-jxl-plugin,
    the `jxl` extra), imported (and registered with Pillow) at first use; without it JXL is refused clearly,
    and before any work is done for the request."""
    fmt = _normalize_format(fmt)
    if fmt == "JXL" and not _jxl_plugin():
        raise InvalidInputs(
            "image_format: JXL needs pillow-jxl-plugin, which this server does not have "
            "(pip install 'diffusers-api[jxl]'); choose PNG, JPEG or WEBP",
            field="image_format",
        )
    return fmt


def mime_type(fmt: str) -> str:
    return _MIME_TYPES[_normalize_format(fmt)]


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _normalize_format(fmt: str) -> str:
    name = str(fmt).strip().upper()
    name = _FORMAT_ALIASES.get(name, name)
    if name not in IMAGE_FORMATS:
        choices = ", ".join(IMAGE_FORMATS)
        raise InvalidInputs(f"image_format: unknown format {fmt!r}, choose one of {choices}")
    return name


def _quality(fmt: str, quality: int | None) -> int:
    if quality is None:
        return _DEFAULT_QUALITY[fmt]
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidInputs(f"image_quality: must be an integer from 1 to 100, got {quality!r}")
    return quality


def _for_png(image: Image.Image) -> Image.Image:
    if image.mode in _PNG_MODES:
        return image
    return image.convert("RGBA") if image.has_transparency_data else image.convert("RGB")


def _for_jpeg(image: Image.Image) -> Image.Image:
    # JPEG has no alpha: flatten on white, as decoding does, rather than expose what lies under transparency.
    if image.mode in _JPEG_MODES:
        return image
    return _to_rgb(image)


def _for_webp(image: Image.Image) -> Image.Image:
    if image.mode in _WEBP_MODES:
        return image
    if image.has_transparency_data and image.mode not in _SIXTEEN_BIT_MODES:
        return image.convert("RGBA")
    return _to_rgb(image)


# --- seeds ------------------------------------------------------------------------------------------------


def draw_seed() -> int:
    """A fresh random seed below 2**32: valid for torch.Generator.manual_seed and exact in JavaScript."""
    return secrets.randbits(32)


def image_seeds(seed: int | None, count: int) -> list[int]:
    """One seed per image, consecutive from `seed` (drawn if None), so any single image can be regenerated."""
    if count < 1:
        raise InvalidInputs(f"number of images must be at least 1, got {count}")
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise InvalidInputs(f"seed: must be an integer from 0 to 2**63 - 1, got {seed!r}")
    # Wrap rather than pass 2**63 on, which torch would accept but many clients could not round-trip.
    return [(seed + offset) % _SEED_LIMIT for offset in range(count)]
