"""Safe image loading and tensor preprocessing (PIL + numpy only; no torchvision).

:func:`load_image` accepts a path, raw bytes, a ``data:image/...;base64,...`` URL or a PIL image
and returns an RGB image, or raises :class:`ImageError` with a message that names the source and
says what to do. It never fetches URLs and only decodes plain raster formats (no EPS/Ghostscript
or other formats whose decoders run external programs). With ``target_size`` it decodes straight to
about twice the size an encoder needs (JPEG at a reduced scale, others reduced right after decoding),
and a shared :class:`DecodeBudget` bounds the pixels a group of loads (one server request) decodes.

:class:`ImagePreprocessor` turns images into normalised ``[B, 3, size, size]`` float tensors.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import re
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DecodeBudget",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_PREPROCESSOR",
    "EFFICIENTNET_LITE0_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "ImagePreprocessor",
    "ImageSource",
    "load_image",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite ("edge models use inception-style mean and stddev"): (x - 127) / 128 on
# 0..255 RGB, i.e. mean 127/255 and std 128/255 on 0..1 pixels.
EFFICIENTNET_LITE0_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE0_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3

# Raster formats whose PIL decoders are pure and well exercised. EPS (runs Ghostscript) and
# exotic formats are refused.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_HINT = "pass a PNG/JPEG/GIF/BMP/WEBP/TIFF image as a file path, raw bytes or a data:image/...;base64 URL"


class ImageError(ValueError):
    """An image could not be loaded; the message names the source and says what to do. ``code`` is
    ``invalid_image``, ``image_too_large`` or ``image_budget_exceeded`` (the server's error codes)."""

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


class DecodeBudget:
    """The pixels that a group of loads (one server request) may decode in total; thread-safe.

    Each load charges what it really decodes (a JPEG drafted to a smaller scale costs less) before
    decoding, so a request over the budget is refused before the image that would cross it is decoded."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels, self.used = int(max_pixels), 0
        self._lock = threading.Lock()

    def charge(self, pixels: int, label: str) -> None:
        with self._lock:
            if self.used + pixels > self.max_pixels:
                raise ImageError(
                    f"image {label}: the images of this request would decode {self.used + pixels:,} pixels "
                    f"in all, over the limit of {self.max_pixels:,}; send fewer or smaller images",
                    code="image_budget_exceeded",
                )
            self.used += pixels


def _load_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


_MALLOC_TRIM = _load_malloc_trim()
_TRIM_ABOVE_PIXELS = 4_000_000  # a decode this large leaves tens of MB that glibc would keep resident


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed large image buffers otherwise)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _describe(source: object, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("data:"):
            return "data URL"
        return text if len(text) <= 200 else text[:200] + "..."
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(source, Image.Image):
        return "PIL image"
    return f"object of type {type(source).__name__}"


def _check_pixels(width: int, height: int, max_pixels: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image {label}: invalid size {width}x{height}; {_HINT}")
    if width * height > max_pixels:
        raise ImageError(
            f"image {label}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,}; downscale the image (or raise max_pixels if you trust the source)",
            code="image_too_large",
        )


def _flatten_palette(img: Image.Image) -> Image.Image | None:
    """A palette image with per-entry transparency (PNG tRNS) as RGB on white, composited in its palette
    (at most 256 entries) rather than pixel by pixel: an RGBA copy, its white background and the composite
    of a 4096^2 image are 64 MB each. None when the palette or transparency is of an unusual kind."""
    palette, trns = img.getpalette("RGB"), img.info.get("transparency")
    if not palette:
        return None
    entries = len(palette) // 3
    alpha = [255] * entries
    if isinstance(trns, int) and 0 <= trns < entries:
        alpha[trns] = 0
    elif isinstance(trns, bytes | bytearray):
        alpha[: len(trns)] = list(trns[:entries])
    else:
        return None
    flat = [round((c * a + 255 * (255 - a)) / 255) for i, c in enumerate(palette) for a in (alpha[i // 3],)]
    copy = img.copy()  # the caller's image keeps its own palette
    copy.info.pop("transparency", None)
    copy.putpalette(flat, "RGB")
    return copy.convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent areas are composited onto white."""
    if img.mode == "P" and "transparency" in img.info:
        flat = _flatten_palette(img)
        if flat is not None:
            return flat
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_data_url(url: str, label: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError(
            f"image {label}: malformed data URL (no comma); expected data:image/png;base64,<data>"
        )
    params = header[len("data:") :].split(";")
    media_type = params[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ImageError(
            f"image {label}: media type {media_type!r} is not an image; use data:image/<type>;base64,<data>"
        )
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageError(
            f"image {label}: only base64 data URLs are supported; use data:image/<type>;base64,<data>"
        )
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(
            f"image {label}: about {len(payload) * 3 // 4:,} bytes exceeds the limit of {max_bytes:,} bytes; "
            "send a smaller image",
            code="image_too_large",
        )
    if "-" in payload or "_" in payload:  # URL-safe alphabet
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(
            f"image {label}: invalid base64 in data URL ({exc}); re-encode the image with standard base64"
        ) from None


_REDUCIBLE_MODES = ("RGB", "RGBA", "L", "LA")  # modes Image.reduce averages correctly (not palettes)


def _reduce_factor(width: int, height: int, target_size: int) -> int:
    """The integer factor that keeps both sides at least twice the encoder's size (its final resize
    then still has enough pixels to average)."""
    return max(1, min(width, height) // (2 * target_size))


def _shrink(img: Image.Image, target_size: int) -> Image.Image:
    factor = _reduce_factor(img.width, img.height, target_size)
    return img.reduce(factor) if factor > 1 else img


def _decode(
    data: bytes, label: str, max_pixels: int, target_size: int | None, budget: DecodeBudget | None
) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    _check_pixels(img.width, img.height, max_pixels, label)  # header only, before decoding
    if target_size and img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale directly
        img.draft("RGB", (2 * target_size, 2 * target_size))
    decoded = img.width * img.height
    if budget is not None:
        budget.charge(decoded, label)
    try:
        img.load()  # full decode: catches corrupt and truncated files
        if target_size and img.mode in _REDUCIBLE_MODES:
            img = _shrink(img, target_size)  # drop the full-size buffer before any copy is made
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block must not reject a good image
            pass
        rgb = _to_rgb(img)
        return _shrink(rgb, target_size) if target_size else rgb
    finally:
        if decoded >= _TRIM_ABOVE_PIXELS:
            img = None  # the full-size buffer goes before the trim
            release_memory()


def _decode_bytes(
    data: bytes,
    label: str,
    max_pixels: int,
    target_size: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    if not data:
        raise ImageError(f"image {label}: empty data; {_HINT}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, label, max_pixels, target_size, budget)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"image {label}: rejected as a possible decompression bomb ({exc}); downscale the image",
            code="image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image {label}: not a recognised image (or a format not allowed here); {_HINT}"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as exc:
        raise ImageError(
            f"image {label}: the file is corrupt or truncated ({type(exc).__name__}: {exc}); "
            "re-export or re-download the image"
        ) from None


def _read_path(source: Path, label: str, max_bytes: int) -> bytes:
    try:
        if not source.exists():
            raise ImageError(f"image {label}: file not found; check the path")
        if not source.is_file():
            raise ImageError(f"image {label}: not a regular file; pass the path of an image file")
        size = source.stat().st_size
        if size > max_bytes:
            raise ImageError(
                f"image {label}: file is {size:,} bytes, over the limit of {max_bytes:,} bytes; "
                "downscale or recompress it",
                code="image_too_large",
            )
        return source.read_bytes()
    except ImageError:  # already says what is wrong (an ImageError is a ValueError too)
        raise
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageError(f"image {label}: cannot read the file ({exc}); check the path") from None


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_bytes: int = 20_000_000,
    max_pixels: int = 40_000_000,
    target_size: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Load an image safely and return it in RGB mode.

    ``source`` is a file path (``str`` or ``Path``), raw ``bytes``, a ``data:image/...;base64,...``
    URL or a PIL image; ``name`` replaces the source's description in error messages. Files and
    payloads over ``max_bytes`` and images over ``max_pixels`` (checked from the header before
    decoding) are refused. Other URLs (``http://``, ``file://`` …) are never fetched. EXIF
    orientation is applied and transparency is composited onto white. With ``target_size`` (the
    encoder's input side) the result is shrunk by an integer factor to no less than twice that size,
    JPEGs already while decoding; ``budget`` is charged the pixels decoded.

    Raises:
        ImageError: with a message naming the source and the fix.
    """
    label = _describe(source, name)
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, max_pixels, label)
        try:
            source.load()
            return _to_rgb(source)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"image {label}: could not be decoded ({exc}); {_HINT}") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageError(
                f"image {label}: {len(data):,} bytes exceeds the limit of {max_bytes:,} bytes; send a smaller image",
                code="image_too_large",
            )
    elif isinstance(source, str) and source[:5].lower() == "data:":
        data = _decode_data_url(source, label, max_bytes)
    elif isinstance(source, str) and _URL_SCHEME.match(source):
        scheme = source.split(":", 1)[0]
        raise ImageError(
            f"image {label}: {scheme}:// URLs are not allowed here (nothing is fetched); "
            "download the image yourself and pass a local path, bytes or a data:image/...;base64 URL"
        )
    elif isinstance(source, (str, Path)):
        data = _read_path(Path(source), label, max_bytes)
    else:
        raise ImageError(f"image {label}: unsupported source type; {_HINT}, or a PIL image")
    return _decode_bytes(data, label, max_pixels, target_size, budget)


_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class ImagePreprocessor:
    """Images to a normalised ``[B, 3, size, size]`` float32 tensor (immutable settings).

    Each image is converted to RGB and resized directly to ``size x size`` (the aspect ratio is
    not kept; square inputs such as easy-VQA's 64x64 images are only scaled). With
    ``center_crop=True`` the central square is cropped first, which keeps the aspect ratio of
    photos. Pixels are scaled to 0..1, then ``(x - mean) / std`` per channel.
    """

    size: int = 224
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    resample: str = "bicubic"
    center_crop: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    def fit(self, image: Image.Image) -> Image.Image:
        """`image` in RGB, cropped and resized to ``size``: what :meth:`prepare` normalises. Preparing the
        fitted image gives the same array as preparing `image` (the steps are then identities), so a
        fitted copy, ``size`` x ``size``, can stand in for a large image read many times."""
        img = image if image.mode == "RGB" else _to_rgb(image)
        if self.center_crop and img.width != img.height:
            side = min(img.width, img.height)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), _RESAMPLE[self.resample])
        return img

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One image as a normalised ``[3, size, size]`` float32 array."""
        img = self.fit(image)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """Preprocess a list of PIL images (or one image) to ``[B, 3, size, size]`` float32."""
        if isinstance(images, Image.Image):
            images = [images]
        if len(images) == 0:
            return torch.empty(0, 3, self.size, self.size)
        return torch.from_numpy(np.stack([self.prepare(img) for img in images]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocessor:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {"size", "mean", "std", "resample", "center_crop"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ImagePreprocessor settings: {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


EFFICIENTNET_LITE0_PREPROCESSOR = ImagePreprocessor(
    size=224, mean=EFFICIENTNET_LITE0_MEAN, std=EFFICIENTNET_LITE0_STD, resample="bicubic"
)
