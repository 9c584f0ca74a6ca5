"""Image input: one loader that accepts what users pass and rejects what it cannot read.

Accepts a path, a PIL image, a numpy array (HxW, HxWx3, HxWx4; uint8, uint16, bool or float
in [0, 1]) or a torch tensor (CxHxW or HxWxC; any float dtype, bfloat16 and float16
included). A float array with values outside [0, 1] (e.g. 0-255 floats) is refused rather
than clipped to a white image. Returns an RGB ``PIL.Image`` in its displayed
orientation (EXIF rotation applied), so every box inside clipground refers to what a
person sees. CMYK, 16-bit, palette, grayscale and alpha images are converted; truncated,
unreadable and oversized images raise :class:`~clipground.errors.BadImageError`.
:func:`load_image_bytes` reads an upload held in memory through the same decoder, with the
same messages (the upload's name where a path would stand).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError, ImageTooLargeError, UnsupportedImageError

#: Largest accepted image, in pixels (width x height). Larger images are refused rather
#: than silently decoding hundreds of megabytes; resize them first.
MAX_PIXELS = 64_000_000
#: Float pixels may overshoot [0, 1] by this much (rounding in the user's own arithmetic).
FLOAT_TOLERANCE = 1e-3

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise BadImageError(f"array of shape {a.shape} is not an image (need HxW, HxWx3 or HxWx4)")
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise BadImageError("image array has NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < -FLOAT_TOLERANCE or hi > 1.0 + FLOAT_TOLERANCE:
            raise BadImageError(
                f"float image array has values in [{lo:g}, {hi:g}], but float pixels must lie in [0, 1]: "
                f"divide by 255 (or pass a uint8 array)"
            )
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise BadImageError(f"unsupported image array dtype {a.dtype}: pass uint8 (0-255), uint16 or float in [0, 1] "
                            f"(e.g. a.astype(np.uint8) for integers in 0-255)")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB the way a viewer would show it."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray((np.clip(a / hi, 0, 1) * 255 + 0.5).astype(np.uint8))
    elif img.mode == "F":
        # PIL's own float images are 0-255 (``convert("F")``); 0-1 ones are scaled up.
        a = np.asarray(img, dtype=np.float32)
        hi = 255.0 if a.size and np.nanmax(a) > 1.0 + FLOAT_TOLERANCE else 1.0
        img = Image.fromarray((np.clip(np.nan_to_num(a) / hi, 0, 1) * 255 + 0.5).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent pixels are what a viewer shows as background.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _decode(source: Any, label: str, max_pixels: int, formats: Sequence[str] | None = None) -> Image.Image:
    """Open and fully decode ``source`` (a path or a binary file object) named ``label`` in messages."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below names the limit; PIL's warning would not.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=formats) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLargeError(
                        f"image {label} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; resize it first"
                    )
                im.load()  # forces full decode: truncated files fail here
                img = ImageOps.exif_transpose(im) or im
                return img.copy()
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"image {label} is over the limit of {max_pixels} pixels (and too large for PIL to decode safely); resize it first"
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"cannot read {label} as an image: not an image file or an unsupported format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode {label}: file is truncated or corrupt ({e})") from None


def _check_size(img: Image.Image, max_pixels: int) -> Image.Image:
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImageError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}; resize it first")
    return _to_rgb(img)


def load_image_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS,
                     formats: Sequence[str] | None = None) -> Image.Image:
    """Load an encoded image held in memory (an upload) like :func:`load_image` loads a file.

    ``name`` stands where a file's path stands in the messages, so a service answers bad
    bytes with the words the CLI uses for the same bytes on disk. ``formats`` limits the
    decoders PIL may try (a service passes a short list of plain raster formats).

    Raises:
        BadImageError: empty, truncated or corrupt bytes; :class:`UnsupportedImageError` for
            bytes that are no image; :class:`ImageTooLargeError` over ``max_pixels``.
    """
    if len(data) == 0:
        raise BadImageError(f"image file is empty (0 bytes): {name}")
    return _check_size(_decode(io.BytesIO(data), name, max_pixels, formats), max_pixels)


def load_image(image: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load ``image`` as an RGB PIL image in displayed orientation.

    Raises:
        BadImageError: missing/unreadable/truncated file, unsupported array, or more
            than ``max_pixels`` pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise BadImageError(f"image not found: {path}")
        if not path.is_file():
            raise BadImageError(f"not a file: {path}")
        if path.stat().st_size == 0:
            raise BadImageError(f"image file is empty (0 bytes): {path}")
        img = _decode(path, str(path), max_pixels)
    elif isinstance(image, Image.Image):
        try:
            image.load()
        except OSError as e:
            raise BadImageError(f"cannot decode image: truncated or corrupt ({e})") from None
        img = ImageOps.exif_transpose(image) or image
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.is_floating_point():  # numpy has no bfloat16; float32 holds every float16/bfloat16 value
            t = t.float()
        img = _from_array(t.numpy())
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise BadImageError(f"unsupported image input of type {type(image).__name__}")
    return _check_size(img, max_pixels)
