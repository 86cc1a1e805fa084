"""The one image preprocessing of the project, shared by training and inference.

Policy (recorded in every model sidecar under "preprocessing"):
  1. Decode with Pillow. JPEGs use draft mode, so a 6000x4000 photo is decoded at the
     smallest 1/2, 1/4 or 1/8 scale that is still at least twice the model input.
  2. Apply the EXIF orientation tag.
  3. Convert any mode to 8-bit RGB: 16-bit greyscale (I;16) is scaled by 65535/255,
     32-bit integer or float greyscale (I, F) by the image's own maximum, palette and alpha images are flattened onto black (the vignette
     colour of dermoscopy), CMYK and the rest go through Pillow's RGB conversion.
  4. Resize to the input size. "squash" (default) resizes the whole image to the target
     size, ignoring aspect ratio, as the ISIC 2017 and HAM10000 sets were made;
     "center_crop" crops the central square first.
  5. Return a float32 HxWx3 array with values 0..255. Normalisation (for example
     EfficientNet-Lite's (x - 127) / 128) lives inside the model, so the same array feeds
     float and quantized models; the runner quantizes it as the input tensor asks.

Only numpy and Pillow are imported here: this module runs on the device.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, io.BytesIO]

# Larger than any dermoscope or phone photo (ISIC 2020's biggest is ~24 Mpx), small enough
# that a crafted "decompression bomb" is refused before it is decoded.
DEFAULT_MAX_PIXELS = 64_000_000

RESIZE_POLICIES = ("squash", "center_crop")
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageError(ValueError):
    """An input that is not a readable image; the message says why, for the user."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; stored in (and read back from) the sidecar."""

    size: tuple[int, int] = (224, 224)  # (height, width) of the model input
    resize: str = "squash"  # one of RESIZE_POLICIES
    resample: str = "bilinear"  # Pillow filter used for the resize
    color: str = "RGB"  # channel order of the array
    value_range: tuple[float, float] = (0.0, 255.0)  # array values before the model

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; use one of {RESIZE_POLICIES}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample filter {self.resample!r}; use one of {list(_RESAMPLE)}")
        if self.color != "RGB":
            raise ValueError("only RGB input is supported")

    def to_dict(self) -> dict:
        return {**asdict(self), "size": list(self.size), "value_range": list(self.value_range),
                "exif_transpose": True, "dtype": "float32", "layout": "HWC"}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        known = {"size", "resize", "resample", "color", "value_range"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def open_image(source: ImageSource, *, draft_size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `source` (path, bytes or file object) into an 8-bit RGB image, EXIF-oriented."""
    name = str(source) if isinstance(source, (str, Path)) else "upload"
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        img = Image.open(source)
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except OSError as e:
        raise ImageError(f"{name}: damaged or truncated image, cannot read its header ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} pixels is over the limit of {max_pixels} pixels")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has no pixels")
    try:
        if draft_size is not None and img.format == "JPEG":
            # Decode at a reduced DCT scale, still at least twice the target size.
            img.draft("RGB", (draft_size[1] * 2, draft_size[0] * 2))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated files end up here ("image file is truncated").
        raise ImageError(f"{name}: damaged or truncated image ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode in ("P", "PA") or "A" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize by the spec's policy to (height, width) = spec.size."""
    h, w = spec.size
    if spec.resize == "center_crop":
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[spec.resample])
    return img


def preprocess(source: ImageSource, spec: PreprocessSpec = PreprocessSpec(), *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file/bytes -> float32 array (H, W, 3), values 0..255, ready for the model."""
    img = open_image(source, draft_size=spec.size, max_pixels=max_pixels)
    return np.asarray(resize(img, spec), dtype=np.float32)


def preprocess_uint8(source: ImageSource, spec: PreprocessSpec = PreprocessSpec(), **kw) -> np.ndarray:
    """The same array as `preprocess`, stored as uint8 (lossless: values are whole 0..255)."""
    return preprocess(source, spec, **kw).astype(np.uint8)


# Truncated files must be reported, never silently half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
