"""The one image preprocessing of the project, shared by training and inference.

Policy (recorded in every model sidecar under "preprocessing"):
  1. Decode with Pillow, through one bounded decoder (`open_image`):
     - only JPEG, PNG, WebP, TIFF and BMP are opened (`ALLOWED_FORMATS`); every other format
       Pillow knows (EPS, PCX, SGI, ...) is refused before its plug-in parses anything;
     - every TIFF directory Pillow loads (a TIFF's pages and sub-directories, EXIF in any
       format, a JPEG's multi-picture block) is checked first: one whose tags would make
       Pillow copy far more than the file holds, or list tens of thousands of strips, is left
       unread and the file refused (`ifd_guard`); so is a JPEG with thousands of segments;
     - the header is checked before any pixel is decoded: total pixels, each side, aspect
       ratio and the bytes the decoded image would take (`DecodeLimits`);
     - JPEGs use draft mode, so a 6000x4000 photo is decoded at the smallest 1/2, 1/4 or 1/8
       scale that is still at least twice the model input; other formats are reduced by an
       integer factor (`Image.reduce`, a box filter) to the same bound right after decoding;
     - any decoder failure (truncation, Pillow's bomb and text-chunk limits, `MemoryError`,
       malformed metadata, ...) becomes an `ImageError` with a plain message.
     Peak memory per image is estimated from the header (`peak_bytes`, measured per mode and
     format) and refused over `DecodeLimits.max_decode_bytes` (400 MB by default); a shared
     `MemoryBudget` bounds the decodes that run at once in the server.
  2. Apply the EXIF orientation tag.
  3. Convert any mode to 8-bit RGB: 16-bit greyscale (I;16) is scaled by 65535/255,
     32-bit integer or float greyscale (I, F) by the image's own maximum (NaN or infinite
     values are refused), palette and alpha images are flattened onto black (the vignette
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
import os
import re
import stat
import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

ImageSource = Union[str, Path, bytes, io.BytesIO]

# The formats a dermoscope, phone or scanner produces. The JPEG plug-in also opens the
# multi-picture JPEGs many phones write, which Pillow then names "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
FORMAT_NAMES = "JPEG, PNG, WebP, TIFF or BMP"
# File name suffixes of those formats: what a folder of images is searched for.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

# Above the largest real dermoscope or phone photo (50 Mpx phone sensors: 8160x6144, 8192x6144).
DEFAULT_MAX_PIXELS = 52_000_000

RESIZE_POLICIES = ("squash", "center_crop")
# Colour constancy after the resize: "shades_of_grey" (Finlayson & Trezzi 2004; p = 6 as in the
# ISIC 2018/2019 top entries) divides each channel by its Minkowski p-mean, so a lesion seen
# under another dermoscope's light gets the same colours. Output is rounded to whole values.
COLOR_CONSTANCY = ("none", "shades_of_grey")
# Bumped whenever the same spec gives different pixels (train.data's pixel cache keys on it):
# 2 = Shades of Grey p-means in float64 from a histogram (1 in 10^4 values moved by one level).
PIXELS_VERSION = 2
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Modes Image.reduce averages correctly; others are converted first ("P" would average indices).
_REDUCIBLE = {"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"}
# Peak bytes per pixel while decoding and shrinking, by mode (measured, tests/test_hostile.py):
# Pillow stores RGB in 4 bytes; reduce() premultiplies alpha into a full-size copy; palette and
# 16-bit images are converted to a 4-byte mode before reduce(). Anything else: 4.
_PEAK_BYTES_PER_PIXEL = {"1": 2, "L": 1, "P": 9, "PA": 9, "LA": 8, "RGBA": 8,
                         "I;16": 6, "I;16L": 6, "I;16B": 6, "I;16N": 6}
# libwebp decodes into its own RGBA buffer, which Pillow then copies (measured 16 bytes/pixel).
_WEBP_PEAK_BYTES_PER_PIXEL = 16


class ImageError(ValueError):
    """An input that is not a readable image. `reason` says why in the user's words; `name`
    is the file (or "upload"); str() gives both."""

    def __init__(self, name: str, reason: str | None = None):
        if reason is None:
            name, reason = "image", name
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclass(frozen=True)
class DecodeLimits:
    """What an input may declare in its header; checked before any pixel is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # width x height
    max_side: int = 20_000  # longest side in pixels
    max_aspect: float = 8.0  # longest / shortest side; a lesion photo is never a strip
    max_decode_bytes: int = 400 * 2**20  # estimated peak memory of one decode (see peak_bytes)
    max_jpeg_scans: int = 200  # progressive JPEGs: libjpeg decodes every scan, even bogus repeats
    max_file_bytes: int = 256 * 1024 * 1024  # files read from disk (uploads are capped by the server)


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects; stored in (and read back from) the sidecar."""

    size: tuple[int, int] = (224, 224)  # (height, width) of the model input
    resize: str = "squash"  # one of RESIZE_POLICIES
    resample: str = "bilinear"  # Pillow filter used for the resize
    color: str = "RGB"  # channel order of the array
    value_range: tuple[float, float] = (0.0, 255.0)  # array values before the model
    color_constancy: str = "none"  # one of COLOR_CONSTANCY, applied after the resize
    constancy_power: int = 6  # Minkowski p of Shades of Grey

    def __post_init__(self):
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(f"unknown colour constancy {self.color_constancy!r}; use one of {COLOR_CONSTANCY}")
        if not 1 <= self.constancy_power <= 16:
            raise ValueError(f"constancy_power must be 1..16, not {self.constancy_power!r}")
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
        known = {"size", "resize", "resample", "color", "value_range", "color_constancy", "constancy_power"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def read_source(source: ImageSource, limits: DecodeLimits) -> tuple[str, io.BytesIO]:
    """(name for messages, in-memory file). Paths must be regular files: a FIFO or a device
    would block or never end, so it is refused from its `stat` before it is opened."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("upload", "empty file (0 bytes)")
        return "upload", io.BytesIO(source)
    if not isinstance(source, (str, Path)):  # a file object: read it whole, within the limit
        data = source.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            raise ImageError("upload", f"over the limit of {limits.max_file_bytes / 2**20:.0f} MB")
        return read_source(bytes(data), limits)
    name = str(source)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except OSError as e:
        raise ImageError(name, f"cannot be read ({e.strerror or 'access error'})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(name, "is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(name, "not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    if st.st_size > limits.max_file_bytes:
        raise ImageError(name, f"file of {st.st_size / 2**20:.0f} MB is over the limit of "
                         f"{limits.max_file_bytes / 2**20:.0f} MB")
    try:
        with open(source, "rb") as f:
            return name, io.BytesIO(f.read(limits.max_file_bytes + 1))
    except OSError as e:
        raise ImageError(name, f"cannot be read ({e.strerror or 'access error'})") from None


def peak_bytes(img: Image.Image, full_size: tuple[int, int] | None = None,
               whole_image_coefficients: bool = False) -> int:
    """Estimated peak memory of decoding and shrinking `img` at its current (draft) size.
    `full_size` is the size before JPEG draft mode: a JPEG that libjpeg decodes with the whole
    image's coefficients (progressive, or sequential in several scans: `jpeg_layout`) keeps every
    one (2 bytes each, per component) whatever the output scale."""
    w, h = img.size
    extra = 0
    buffered = whole_image_coefficients or img.info.get("progressive") or img.info.get("progression")
    if img.format in ("JPEG", "MPO") and buffered:
        fw, fh = full_size or img.size
        extra = fw * fh * 2 * len(img.getbands())
    if img.format == "TIFF":  # libtiff allocates whole tiles, whatever the image size says
        tile = img.tag_v2.get(322, 0) * img.tag_v2.get(323, 0)
        extra = tile * _peak_per_pixel(img)
    return w * h * _peak_per_pixel(img) + extra


def _peak_per_pixel(img: Image.Image) -> int:
    per_pixel = _PEAK_BYTES_PER_PIXEL.get(img.mode, 4)
    if img.format == "WEBP":
        per_pixel = _WEBP_PEAK_BYTES_PER_PIXEL
    if img.format == "TIFF":  # samples wider than Pillow's storage (16-bit RGB, float64) add a raw buffer
        bits = img.tag_v2.get(258, (8,))  # BitsPerSample, one entry per sample
        bits = sum(bits) if isinstance(bits, tuple) else int(bits)
        if bits > 32:
            per_pixel += -(-int(bits) // 8)
    return per_pixel


class MemoryBudget:
    """Bytes of decoding that may run at once (the server shares one between its threads):
    `with budget.reserve(n):` waits until n bytes are free. n never exceeds the capacity,
    because `check_memory` refuses such images first."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int):
        nbytes = min(nbytes, self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


def check_header(img: Image.Image, name: str, limits: DecodeLimits) -> None:
    """Refuse from the header alone: no pixels are decoded yet."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(name, "image has no pixels")
    if w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise ImageError(name, f"{w}x{h} pixels is over the limit of {limits.max_pixels:,} pixels "
                         f"and {limits.max_side:,} per side")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageError(name, f"{w}x{h} pixels is not a photo of a lesion (sides more than "
                         f"{limits.max_aspect:g} to 1)")
    if img.format == "TIFF":
        tw, th = img.tag_v2.get(322, 0), img.tag_v2.get(323, 0)
        if tw > _ceil16(w) or th > _ceil16(h):
            raise ImageError(name, f"its TIFF tiles ({tw}x{th}) are larger than the image ({w}x{h})")


def _ceil16(n: int) -> int:
    return -(-n // 16) * 16


# A marker in JPEG entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart marker
# (D0-D7) nor another 0xFF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_BARE_MARKERS = {0x01, 0xD8} | set(range(0xD0, 0xD8))  # markers without a length field
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start of frame (C4 DHT, C8 JPG, CC DAC)
_JPEG_PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
MAX_JPEG_HEADER_SEGMENTS = 4096  # a photo has a few dozen; Pillow keeps a list entry for each


@dataclass(frozen=True)
class JpegLayout:
    segments: int  # header segments before the first scan
    scans: int  # scans of the main image, up to its EOI
    whole_image_coefficients: bool  # libjpeg buffers every DCT coefficient of the full image


def jpeg_layout(data) -> JpegLayout:
    """How libjpeg will decode a JPEG's main image. Thumbnails inside EXIF and the further
    pictures of an MPO file are not counted; junk between segments is skipped to the next marker,
    as libjpeg does. The whole image's coefficients are buffered (jdinput.c, has_multiple_scans)
    for a progressive frame or when the first scan does not cover every component."""
    segments, scans, pos, n = 0, 0, 2, len(data)
    components, buffered = 0, False
    while pos + 1 < n:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):
            m = _JPEG_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in _JPEG_BARE_MARKERS:
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF and pos + 9 < n:
            components = data[pos + 9]
            buffered = buffered or marker in _JPEG_PROGRESSIVE_SOF
        if marker == 0xDA:  # SOS: its header, then entropy-coded data up to the next marker
            if scans == 0 and pos + 4 < n and data[pos + 4] < components:
                buffered = True
            scans += 1
            m = _JPEG_MARKER.search(data, end)
            if m is None:
                break
            pos = m.start()
            continue
        segments += scans == 0
        pos = end
    return JpegLayout(segments, scans, buffered or scans > 1)


def check_jpeg(data, name: str, limits: DecodeLimits) -> JpegLayout | None:
    """Before Pillow opens a JPEG: refuse thousands of header segments (Pillow keeps each) or of
    scans (libjpeg decodes every one, even bogus repeats: minutes of a core). None for other files."""
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    layout = jpeg_layout(data)
    if layout.segments > MAX_JPEG_HEADER_SEGMENTS:
        raise ImageError(name, f"a JPEG with {layout.segments:,} metadata segments (a photo has a few dozen)")
    if layout.scans > limits.max_jpeg_scans:
        raise ImageError(name, f"a JPEG with {layout.scans} scans (a photo has at most a few dozen)")
    return layout


# --------------------------------------------------------------------------- TIFF directories
# Pillow loads a TIFF directory (IFD) for a TIFF file's pages and sub-directories, for EXIF in
# every format (JPEG APP1, PNG eXIf and text, WebP) and for a JPEG's multi-picture block. It copies
# each tag's value, however many tags point at the same bytes, and may unpack numbers into tuples
# (a Python object per value). `ifd_guard` checks each directory's entry table before Pillow
# loads it: what all directories of one file may cost together is bounded by the file's size.
_TIFF_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_TIFF_RAW_TYPES = {1, 2, 7}  # BYTE, ASCII and UNDEFINED stay bytes; numbers may become tuples:
_TIFF_VALUE_BYTES = {5: 100, 10: 100}  # an IFDRational object each; other numbers an int or float (40)
_TIFF_OFFSET_TAGS = {273, 279, 324, 325}  # StripOffsets/ByteCounts, TileOffsets/ByteCounts
MAX_TIFF_STRIPS = 20_000  # a strip holds at least one row (max_side rows); tiles are 256 px or more
METADATA_BUDGET_SLACK = 2 << 20
_ifd_state = threading.local()
_load_ifd = TiffImagePlugin.ImageFileDirectory_v2.load


def ifd_cost(fp, little: bool, big: bool) -> tuple[int, int]:
    """(estimated bytes of loading the directory at fp's position, its largest count of strip or
    tile offsets). Each value stored outside its entry is counted, capped at what the stream
    holds past its offset; numbers as the Python objects they become once unpacked. fp is left
    where it was."""
    order = "little" if little else "big"
    here = fp.tell()
    try:
        size = fp.seek(0, io.SEEK_END)
        fp.seek(here)
        count_bytes, word, entry_bytes = (8, 8, 20) if big else (2, 4, 12)
        entries = int.from_bytes(fp.read(count_bytes), order)
        table = fp.read(min(entries, max(0, size - here - count_bytes) // entry_bytes) * entry_bytes)
    finally:
        fp.seek(here)
    cost, strips = 0, 0
    for e in range(0, len(table) - entry_bytes + 1, entry_bytes):
        tag, kind = int.from_bytes(table[e:e + 2], order), int.from_bytes(table[e + 2:e + 4], order)
        unit = _TIFF_TYPE_BYTES.get(kind)
        if unit is None:  # Pillow skips types it does not know
            continue
        count = int.from_bytes(table[e + 4:e + 4 + word], order)
        if tag in _TIFF_OFFSET_TAGS:
            strips = max(strips, count)
        if count * unit > word:  # stored outside the entry
            offset = int.from_bytes(table[e + 4 + word:e + 4 + 2 * word], order)
            held = max(0, min(count * unit, size - offset))
            cost += held if kind in _TIFF_RAW_TYPES else held // unit * _TIFF_VALUE_BYTES.get(kind, 40)
    return cost, strips


def _guarded_load(ifd, fp):
    state = getattr(_ifd_state, "active", None)
    if state is not None and state["refusal"] is None:
        try:  # ImageFileDirectory_v2's _endian/_bigtiff: Pillow internals (Pillow is pinned)
            cost, strips = ifd_cost(fp, ifd._endian == "<", ifd._bigtiff)
        except (OSError, ValueError):  # an unreadable table: Pillow's own load fails on it as well
            cost, strips = 0, 0
        if strips > MAX_TIFF_STRIPS:
            state["refusal"] = f"its TIFF directory lists {strips:,} strips or tiles (at most {MAX_TIFF_STRIPS:,})"
        elif cost > state["left"]:
            state["refusal"] = (f"its metadata would take {cost / 2**20:,.0f} MB to read from a file of "
                                f"{state['file'] / 2**20:,.1f} MB (crafted or damaged metadata)")
        state["left"] -= cost
    if state is not None and state["refusal"] is not None:
        ifd.reset()  # load nothing; open_image refuses the file (an exception here could be
        ifd.next = 0  # swallowed: Pillow reads JPEG EXIF for the DPI inside a try)
        return
    _load_ifd(ifd, fp)


TiffImagePlugin.ImageFileDirectory_v2.load = _guarded_load


@contextmanager
def ifd_guard(file_bytes: int):
    """While active (in this thread), the TIFF directories Pillow loads may together cost at most
    twice the file's size plus 2 MB; `refusal()` then says why a directory was left unread."""
    state = {"left": 2 * file_bytes + METADATA_BUDGET_SLACK, "file": file_bytes, "refusal": None}
    outer = getattr(_ifd_state, "active", None)
    _ifd_state.active = state
    try:
        yield lambda: state["refusal"]
    finally:
        _ifd_state.active = outer


def check_memory(img: Image.Image, name: str, limits: DecodeLimits, full_size=None,
                 whole_image_coefficients: bool = False) -> int:
    """Refuse an image whose decode would need more than the limit; return the estimate."""
    need = peak_bytes(img, full_size, whole_image_coefficients)
    if need > limits.max_decode_bytes:
        w, h = img.size
        raise ImageError(name, f"{w}x{h} pixels in this format and bit depth would need over "
                         f"{limits.max_decode_bytes / 2**20:.0f} MB to decode")
    return need


def shrink(img: Image.Image, target: tuple[int, int] | None) -> Image.Image:
    """Integer box reduction to no less than twice the (height, width) target, as JPEG draft does."""
    if target is None:
        return img
    factor = min(img.width // (2 * target[1]), img.height // (2 * target[0]))
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE:
        img = img.convert({"1": "L", "P": "RGBA", "PA": "RGBA"}.get(img.mode, "I"))
    return img.reduce(factor)


_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def orientation(img: Image.Image) -> Image.Transpose | None:
    """The transpose that the EXIF orientation tag asks for (as ImageOps.exif_transpose), read
    before the image is reduced; a malformed EXIF block is ignored, not fatal."""
    try:
        return _ORIENTATION.get(img.getexif().get(0x0112))
    except Exception:  # noqa: BLE001 - broken metadata in a readable photo
        return None


def check_complete(img: Image.Image, name: str, file_bytes: int, full_size: tuple[int, int]) -> None:
    """A JPEG whose header claims more rows than its data holds is padded by libjpeg with flat
    grey (128) and no error. Refuse it when both show: the bottom rows are exactly that grey,
    and the file is too short to hold the declared image (Huffman coding needs at least one bit
    per 8x8 block of luma, even for a blank frame)."""
    blocks = -(-full_size[0] // 8) * -(-full_size[1] // 8)
    if file_bytes * 8 >= blocks:
        return
    a = np.asarray(img)
    tail = a[-max(1, a.shape[0] // 8):]
    if (tail == 128).all() and not (a == 128).all():
        raise ImageError(name, "the file holds less image data than its header declares "
                         "(truncated or altered)")


def open_image(source: ImageSource, *, draft_size: tuple[int, int] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
               budget: MemoryBudget | None = None) -> Image.Image:
    """Decode `source` (path, bytes or file object) into an 8-bit RGB image, EXIF-oriented.

    With `draft_size` (height, width) the image is decoded or reduced to no less than twice
    that size. Every failure is an `ImageError` whose message is meant for the user."""
    limits = limits or DecodeLimits(max_pixels=max_pixels)
    name, stream = read_source(source, limits)
    with ifd_guard(len(stream.getbuffer())) as refusal:
        try:
            img = _decode(stream, name, draft_size, limits, budget)
        except ImageError:
            if refusal() is None:
                raise
            raise ImageError(name, refusal()) from None
        if refusal() is not None:  # a directory was left unread: the decode may not be faithful
            raise ImageError(name, refusal())
        return img


DAMAGED = "damaged or truncated image, it cannot be decoded"


def _decode(stream: io.BytesIO, name: str, draft_size, limits: DecodeLimits, budget) -> Image.Image:
    try:
        jpeg = check_jpeg(stream.getbuffer(), name, limits)
        with Image.open(stream, formats=ALLOWED_FORMATS) as img:
            check_header(img, name, limits)
            full_size = img.size
            if draft_size is not None and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft_size[1] * 2, draft_size[0] * 2))
            need = check_memory(img, name, limits, full_size, jpeg is not None and jpeg.whole_image_coefficients)
            with budget.reserve(need) if budget is not None else nullcontext():
                img.load()
                is_jpeg, mode, turn = img.format in ("JPEG", "MPO"), img.mode, orientation(img)
                out = shrink(img, draft_size)
                if is_jpeg:  # before the EXIF turn: libjpeg's padding is at the bottom of the stored image
                    check_complete(out, name, len(stream.getbuffer()), full_size)
                out = to_rgb(out.transpose(turn) if turn is not None else out, name, source_mode=mode)
        return out
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, f"not an image in a supported format ({FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, f"the image declares more pixels than the limit of "
                         f"{limits.max_pixels:,}") from None
    except MemoryError:
        raise ImageError(name, "the image is too large to decode") from None
    except ValueError as e:
        if "MAX_TEXT_CHUNK" in str(e):  # Pillow's PNG limits on text and colour-profile chunks
            raise ImageError(name, f"its metadata (a text or colour-profile chunk) is over the "
                             f"{PngImagePlugin.MAX_TEXT_CHUNK / 2**20:g} MB allowed; save the picture without it") from None
        if "MAX_TEXT_MEMORY" in str(e):
            raise ImageError(name, f"its text and colour-profile chunks together are over the "
                             f"{PngImagePlugin.MAX_TEXT_MEMORY / 2**20:g} MB allowed; save the picture without them") from None
        raise ImageError(name, DAMAGED) from None
    except Exception:  # noqa: BLE001 - any decoder failure is the input's fault, never a crash
        raise ImageError(name, DAMAGED) from None


def to_rgb(img: Image.Image, name: str = "image", source_mode: str | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules).
    `source_mode` is the mode before `shrink`, which widens I;16 to I."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageError(name, "the image holds invalid (NaN or infinite) values")
        top = 65535.0 if (source_mode or img.mode).startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if img.mode in ("P", "PA") or "A" in img.mode or "a" in img.mode or "transparency" in img.info:
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
               max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
               budget: MemoryBudget | None = None) -> np.ndarray:
    """Image file/bytes -> float32 array (H, W, 3), values 0..255, ready for the model."""
    return finish(resized_array(source, spec, max_pixels=max_pixels, limits=limits, budget=budget), spec)


def resized_array(source: ImageSource, spec: PreprocessSpec = PreprocessSpec(), *,
                  max_pixels: int = DEFAULT_MAX_PIXELS, limits: DecodeLimits | None = None,
                  budget: MemoryBudget | None = None, dtype=np.float32) -> np.ndarray:
    """The decoded image at the model's size, 0..255 (float32, or uint8 with `dtype`), before
    colour constancy (what the image-quality checks and the heatmap overlay look at)."""
    img = open_image(source, draft_size=spec.size, max_pixels=max_pixels, limits=limits, budget=budget)
    return np.array(resize(img, spec), dtype=dtype)  # a writable array (asarray's view of Pillow's is not)


def finish(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The last step of `preprocess`: colour constancy, if the spec has one."""
    if spec.color_constancy == "shades_of_grey":
        return shades_of_grey(x, spec.constancy_power)
    return x


def shades_of_grey(x: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Grey colour constancy of an (H, W, 3) array, values 0..255: each channel is
    scaled by (grey level / its Minkowski p-mean), with the grey level set so that a neutral
    image is unchanged. Whole values out (so the uint8 pixel cache holds exactly this array):
    uint8 for uint8 input (the runner's path, which the int8 files take as they are), else float32.

    A decoded image has whole values 0..255, so its p-means come from the three channel
    histograms and the correction is a per-channel lookup table, both in Pillow's C code (about
    0.2 ms at 224x224, against 2-3 ms for the p-th power of every pixel in numpy; benchmarks
    report it). Other input (fractional values) takes the per-pixel path; both give the same
    result on whole values (tests/test_diagnoses.py)."""
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"Shades of Grey needs an (H, W, 3) array, not shape {x.shape}")
    whole = _whole_uint8(x)
    if whole is not None:
        img = Image.fromarray(np.ascontiguousarray(whole), "RGB")
        counts = np.asarray(img.histogram(), dtype=np.float64).reshape(3, 256)
        mean_p = counts @ ((np.arange(256) / 255.0) ** p) / max(1, whole.size // 3)
    else:
        if not np.isfinite(x).all():
            raise ValueError("Shades of Grey needs finite values (0..255)")
        mean_p = np.mean((x.reshape(-1, 3).astype(np.float64) / 255.0) ** p, axis=0)
    illuminant = mean_p ** (1.0 / p)  # (3,)
    norm = float(np.sqrt(np.sum(illuminant ** 2)))
    if norm < 1e-6:  # a black frame: nothing to correct
        return whole.copy() if x.dtype == np.uint8 else np.round(np.asarray(x, dtype=np.float32))
    gain = (1.0 / (illuminant / norm * np.sqrt(3.0) + 1e-6)).astype(np.float32)
    if whole is None:
        return np.clip(np.round(x.astype(np.float32) * gain), 0.0, 255.0)
    # the float32 arithmetic of the per-pixel line above, once per (channel, value)
    table = np.clip(np.round(np.arange(256, dtype=np.float32)[None, :] * gain[:, None]), 0.0, 255.0)
    out = np.array(img.point(table.astype(np.uint8).ravel().tolist()))  # writable, as the float path's
    return out if x.dtype == np.uint8 else out.astype(np.float32)


def _whole_uint8(x: np.ndarray) -> np.ndarray | None:
    """x as uint8 if every value is a whole number 0..255 (a decoded image), else None."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.number):
        return None
    with np.errstate(invalid="ignore"):  # NaN or out of range: not equal below
        u = x.astype(np.uint8)
    return u if np.array_equal(u, x) else None


def preprocess_uint8(source: ImageSource, spec: PreprocessSpec = PreprocessSpec(), **kw) -> np.ndarray:
    """The same array as `preprocess`, stored as uint8 (lossless: values are whole 0..255)."""
    return preprocess(source, spec, **kw).astype(np.uint8)


# Truncated files must be reported, never silently half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's notes on corrupt metadata are not for the user, and a bomb warning is an error. Set
# once, at import: warnings.catch_warnings() around each decode is not thread-safe (the server
# and the CLI's decode pool decode in threads; one thread leaving the block restored the filters
# under another, whose warning then reached stderr).
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _quiet_libtiff() -> None:
    """libtiff prints its decoding errors straight to file descriptor 2 (Pillow still raises
    them, and we name the file); with decoding in threads those bytes cut through our own lines.
    Clear its error and warning handlers (Linux, where /proc lists the loaded library; a no-op
    elsewhere)."""
    try:
        import ctypes
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libtiff" in line and ".so" in line}
        for path in paths:
            lib = ctypes.CDLL(path)
            lib.TIFFSetErrorHandler(None)
            lib.TIFFSetWarningHandler(None)
    except (OSError, AttributeError):
        pass


_quiet_libtiff()
