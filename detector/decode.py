"""Decoding an image with its limits: the one decode path that preprocess, validation and the
served model share, so that what the model sees in service is byte for byte what it saw in
training. It ships inside every model (detector/), so it imports nothing from the repository."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


# Safe defaults of the decoding limits (params.yaml: preprocess.max_pixels, preprocess.max_bytes).
# 50 million pixels is a 7000x7000 frame (200 MB as RGBA once decoded): far above any inspection
# camera, far below Pillow's own bomb limit (about 179 million pixels), which stays on as well.
DEFAULT_MAX_PIXELS = 50_000_000


DEFAULT_MAX_BYTES = 50 * 1024 * 1024


# The formats decoded (params.yaml: validate.allowed_formats). Pillow knows some 40, and each
# is a decoder an upload could reach (GIF, TIFF, WEBP, EPS through Ghostscript...); only these
# are ever handed to Pillow, so every other decoder stays out of reach of the data and the clients.
DEFAULT_FORMATS = ("PNG", "JPEG")


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class DecodeLimits:
    """What a file may cost before it is decoded: its size on disk and its pixel count, and
    the formats (Pillow's names) that may be decoded at all.

    All are checked before any pixel is decoded (the pixel count from the header), so a
    decompression bomb, a huge upload or a file for another decoder is refused without the
    memory or the code it would take.
    """
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError(f"decode limits must be positive, got {self}")
        formats = tuple(str(name).upper() for name in self.formats)
        object.__setattr__(self, "formats", formats)
        if not formats:
            raise ValueError("decode limits must allow at least one format (validate.allowed_formats)")
        unknown = [name for name in formats if name not in DEFAULT_FORMATS and name not in _pillow_formats()]
        if unknown:
            raise ValueError(f"unknown image format(s) {', '.join(map(repr, unknown))} in validate.allowed_formats; "
                             f"Pillow's names are {', '.join(sorted(_pillow_formats()))}")

    def check_bytes(self, size: int) -> None:
        if size > self.max_bytes:
            raise ImageDecodeError(f"file too large: {size} bytes, over the limit max_bytes={self.max_bytes}; "
                                   "not decoded")

    def check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ImageDecodeError(f"image too large: {width}x{height} = {width * height} pixels, over the limit "
                                   f"max_pixels={self.max_pixels}; not decoded (a decompression bomb?)")

    def as_dict(self) -> dict[str, int | list[str]]:
        return {"max_pixels": self.max_pixels, "max_bytes": self.max_bytes, "formats": list(self.formats)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "DecodeLimits":
        """From a model's spec.json; a spec without limits (or, registered before formats were
        recorded, without ``formats``) gets the safe defaults: PNG and JPEG only."""
        values = values or {}
        return cls(max_pixels=int(values.get("max_pixels", DEFAULT_MAX_PIXELS)),
                   max_bytes=int(values.get("max_bytes", DEFAULT_MAX_BYTES)),
                   formats=tuple(values.get("formats") or DEFAULT_FORMATS))


def _pillow_formats() -> set[str]:
    Image.init()  # every plugin registered: only for a name beyond the defaults, or a refused file
    return set(Image.ID)


def _sniffed_format(data: bytes) -> str | None:
    """The format a file announces, by the magic-number test each Pillow plugin registers
    (its 16-byte prefix, as Image.open reads it): no decoder runs, so a refused format can be
    named without parsing a byte of it."""
    prefix = data[:16]
    _pillow_formats()
    for name in list(Image.ID):  # Pillow's own order, so a prefix two plugins accept gets its name
        accept = Image.OPEN[name][1]
        try:
            answer = accept(prefix) if accept is not None else False
        except Exception:  # a plugin's test on too short a prefix
            continue
        if answer and not isinstance(answer, str):  # a text answer is Pillow's "maybe, with a warning"
            return name
    return None


DEFAULT_LIMITS = DecodeLimits()


def open_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, verify: bool = True) -> Image.Image:
    """Decode fully (not just the header) so truncated files fail here, not in training.

    ``limits`` are checked first: the byte count; then only the allowed formats' decoders
    are tried (``Image.open(..., formats=limits.formats)``: any other format is refused by
    name, and its decoder never sees the bytes); then the pixel count read from the
    header, before any pixel is decoded. Pillow's decompression-bomb limit stays on as
    well, and truncated images are never accepted (``ImageFile.LOAD_TRUNCATED_IMAGES``
    is never switched on). ``verify`` also checks every chunk's checksum (PNG CRCs),
    which needs a second open: validation does it; decoding for preprocess (after
    validation) and for the served model does not, like any image viewer (15 % of the
    decoding time, measured by benchmarks/scoring.py).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    limits.check_bytes(len(data))
    try:
        if verify:
            with Image.open(io.BytesIO(data), formats=limits.formats) as probe:
                limits.check_pixels(*probe.size)
                probe.verify()
        image = Image.open(io.BytesIO(data), formats=limits.formats)
        limits.check_pixels(*image.size)  # from the header: nothing is decoded yet
        image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"decompression bomb refused: {error}") from None
    except UnidentifiedImageError:
        found = _sniffed_format(data)
        if found is not None and found not in limits.formats:
            raise ImageDecodeError(f"{found} is not an allowed format (validate.allowed_formats: "
                                   f"{', '.join(limits.formats)}); not decoded") from None
        raise ImageDecodeError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None
    except MemoryError:
        raise
    except Exception as error:  # a malformed file makes Pillow raise almost anything (IndexError, struct.error)
        raise ImageDecodeError(f"corrupt or truncated image: {type(error).__name__}: {error}") from None
    return image


def to_array(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """Convert mode, resize (bilinear, antialiased) and return uint8 CHW."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array16 = np.asarray(image, dtype=np.float32)
        peak = max(float(array16.max()), 1.0)
        image = Image.fromarray((array16 / (65535.0 if peak > 255 else 255.0) * 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    array = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        return array[None, :, :]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def decode_to_array(data: bytes, size: int, channels: int, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    return to_array(open_image(data, limits, verify=False), size, channels)
