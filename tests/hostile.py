"""A corpus of hostile image files, generated at test time (no binary blob is committed).

`corpus()` returns {file name: bytes}, over 500 files in these categories (the name's prefix):
  trunc_   valid files of every allowed format cut at many points
  hdr_     headers that declare huge, zero or absurd sizes, in allowed and refused formats
  bomb_    real decompression bombs: tiny files that decode to gigabytes (1 x 64,000,000 PNG, ...)
  chunk_   PNG text/ICC chunks over Pillow's limits, and thousands of chunks
  meta_    TIFF directories and EXIF/MPF blocks whose tags all point at one block (copied per tag)
  aspect_  extreme aspect ratios within the pixel limit
  mode_    every mode and bit depth (16-bit, float with NaN/inf, CMYK, palette, 1-bit, RLE BMP)
  fmt_     valid images in formats that are refused (GIF, EPS, PCX, SGI, TGA, ICO, PPM, ...)
  fake_    non-images: PDF, ZIP, HTML, SVG, ELF, text, random bytes, empty
  poly_    polyglots: an image with a ZIP, HTML or script appended or embedded
  mut_     random byte flips, insertions and splices of valid files (seeded)
`VALID` names the files that are real, decodable lesion-like images and must be classified.
"""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
from PIL import Image

from .conftest import lesion_image


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, idat: bytes, bit_depth=8, colour=0, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def zeros_stream(n: int) -> bytes:
    """zlib stream of n zero bytes, built in pieces (never n bytes in memory at once)."""
    comp = zlib.compressobj(9)
    block = bytes(1 << 20)
    out = [comp.compress(block) for _ in range(n >> 20)]
    out.append(comp.compress(bytes(n & ((1 << 20) - 1))))
    return b"".join(out) + comp.flush()


def lesion(seed=0, size=(96, 80)) -> Image.Image:
    return lesion_image(seed, size=size, melanoma=seed % 2 == 0)


def valid_files() -> dict[str, bytes]:
    img = lesion(1)
    return {
        "valid_baseline.jpg": save(img, "JPEG", quality=90),
        "valid_progressive.jpg": save(lesion(2), "JPEG", progressive=True),
        "valid.png": save(lesion(3), "PNG"),
        "valid_lossy.webp": save(lesion(4), "WEBP", quality=80),
        "valid_lossless.webp": save(lesion(5), "WEBP", lossless=True),
        "valid_raw.tif": save(lesion(6), "TIFF"),
        "valid_deflate.tif": save(lesion(7), "TIFF", compression="tiff_adobe_deflate"),
        "valid.bmp": save(lesion(8), "BMP"),
        "valid_large.jpg": save(lesion(9, size=(1600, 1200)), "JPEG", quality=92),
        "valid_large.png": save(lesion(10, size=(1200, 900)), "PNG", compress_level=1),
    }


VALID = set(valid_files())


def truncations(valid: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name, data in valid.items():
        for frac in (0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.97, 0.995):
            out[f"trunc_{int(frac * 1000):03d}_{name}"] = data[:max(1, int(len(data) * frac))]
        out[f"trunc_head8_{name}"] = data[:8]
    return out


def tiff_with_tile(width: int, height: int, tile: int) -> bytes:
    """A little-endian greyscale TIFF of one deflate tile of tile x tile zero bytes."""
    data = zeros_stream(tile * tile)
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
            (322, 4, tile), (323, 4, tile), (324, 4, 0), (325, 4, len(data))]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, data_offset if tag == 324 else value)
                       for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags)) + entries + bytes(4) + data


def amplified_ifd(n_tags: int, payload: int, base=()) -> tuple[bytes, int]:
    """(a little-endian TIFF structure whose first IFD holds `base` entries (tag, type, value;
    value None points at the payload) and n_tags private BYTE tags that all point at the same
    `payload` zero bytes, the payload's offset). Loading its tags copies n_tags x payload bytes."""
    entries = sorted(list(base) + [(40000 + i, 1, None) for i in range(n_tags)], key=lambda e: e[0])
    payload_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        if value is None:
            ifd += struct.pack("<HHII", tag, kind, payload if kind == 1 else 1, payload_at)
        else:
            ifd += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value, *((0,) if kind == 3 else ()))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(4) + bytes(payload), payload_at


def jpeg_with_segment(marker: int, block: bytes) -> bytes:
    jpeg = save(lesion(14, size=(48, 40)), "JPEG")
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(block) + 2) + block + jpeg[2:]


def metadata_bombs() -> dict[str, bytes]:
    """Metadata whose many tags all point at one block: Pillow copies the block once per tag while
    opening the file (TIFF directory, JPEG EXIF and MPF) or reading its EXIF orientation (PNG,
    WebP). 4 MB files that would take 1.2 GB (TIFF: twice that), and 64 KB JPEG segments 86 MB."""
    # a 64 x 64 grey TIFF whose strip is the payload (zeros), plus 300 tags on the same 4 MB
    strip = [(256, 3, 64), (257, 3, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None),
             (277, 3, 1), (278, 3, 64), (279, 4, 64 * 64)]
    tiff, at = amplified_ifd(300, 4 << 20, strip)
    exif, _ = amplified_ifd(300, 4 << 20, [(0x0112, 3, 1)])
    small, _ = amplified_ifd(2700, 32000)
    img = lesion(15, size=(64, 48))
    return {"meta_tiff_300_tags_on_4MB.tif": tiff,
            "meta_png_exif_300_tags_on_4MB.png": save(img, "PNG", exif=exif),
            "meta_webp_exif_300_tags_on_4MB.webp": save(img, "WEBP", exif=b"Exif\x00\x00" + exif),
            "meta_jpeg_exif_2700_tags_on_32KB.jpg": jpeg_with_segment(0xE1, b"Exif\x00\x00" + small),
            "meta_jpeg_mpf_2700_tags_on_32KB.jpg": jpeg_with_segment(0xE2, b"MPF\x00" + small)}


def multiscan_jpeg(side: int, components: int = 3) -> bytes:
    """A flat grey sequential (SOF0) JPEG with one scan per component, not interleaved: libjpeg
    keeps every DCT coefficient of the full image to decode it, whatever the draft scale."""
    def seg(marker, payload):
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    blocks = (side // 8) ** 2
    assert side % 8 == 0 and blocks % 4 == 0
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    dc_bits, ac_bits = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D]
    ac_values = bytes.fromhex(  # the standard luminance AC table (ITU T.81, K.3)
        "01020300041105122131410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728"
        "292a3435363738393a434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a"
        "92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4"
        "e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9fa")
    out = (b"\xff\xd8" + seg(0xDB, bytes([0]) + bytes([1] * 64))
           + seg(0xC0, struct.pack(">BHHB", 8, side, side, components) + comps)
           + seg(0xC4, bytes([0x00]) + bytes(dc_bits) + bytes(range(12)) + bytes([0x10]) + bytes(ac_bits) + ac_values))
    for i in range(components):  # per block: DC difference 0 ("00") and end of block ("1010")
        out += seg(0xDA, bytes([1, i + 1, 0x00]) + b"\x00\x3f\x00") + b"\x28\xa2\x8a" * (blocks // 4)
    return out + b"\xff\xd9"


def repeat_last_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG with its last scan (SOS segment and data) repeated `times` times."""
    start = jpeg.rfind(b"\xff\xda")
    scan = jpeg[start:-2]  # up to the EOI marker
    return jpeg[:-2] + scan * times + b"\xff\xd9"


def header_sizes() -> dict[str, bytes]:
    """Real files whose declared dimensions are patched to huge, zero or absurd values."""
    out = {}
    small = lesion(11, size=(16, 16))
    jpeg = bytearray(save(small, "JPEG"))
    sof = jpeg.find(b"\xff\xc0")
    for w, h in ((65535, 65535), (8000, 8000), (6000, 4000), (2000, 2000), (1, 65535), (65535, 1), (0, 0), (0, 100), (9000, 9000)):
        j = bytearray(jpeg)
        j[sof + 5:sof + 9] = struct.pack(">HH", h, w)
        out[f"hdr_jpeg_{w}x{h}.jpg"] = bytes(j)
    png = bytearray(save(small, "PNG"))
    for w, h in ((1, 64_000_000), (64_000_000, 1), (100_000, 100_000), (2**31 - 1, 2**31 - 1),
                 (0, 0), (8000, 8000), (7072, 7072), (30000, 1000)):
        p = bytearray(png)
        p[16:24] = struct.pack(">II", w, h)
        p[29:33] = struct.pack(">I", zlib.crc32(bytes(p[12:29])))
        out[f"hdr_png_{w}x{h}.png"] = bytes(p)
    bmp = bytearray(save(small, "BMP"))
    for w, h in ((100_000, 100_000), (1, 2**31 - 1), (-16, 16), (16, -16), (0, 0), (40000, 40000)):
        b = bytearray(bmp)
        b[18:26] = struct.pack("<ii", w, h)
        out[f"hdr_bmp_{w}x{h}.bmp"] = bytes(b)
    tif = save(small, "TIFF")
    for w, h in ((100_000, 100_000), (1, 60_000_000), (0, 0)):
        img = Image.open(io.BytesIO(tif))
        buf = io.BytesIO()
        img.save(buf, "TIFF")
        t = bytearray(buf.getvalue())
        for tag, value in ((256, w), (257, h)):  # ImageWidth, ImageLength as SHORT or LONG entries
            pos = t.find(struct.pack("<H", tag), 8)
            if pos > 0:
                t[pos + 2:pos + 12] = struct.pack("<HII", 4, 1, value)
        out[f"hdr_tiff_{w}x{h}.tif"] = bytes(t)
    # TIFF whose one tile is far larger than the image (libtiff allocates the whole tile)
    out["hdr_tiff_huge_tile.tif"] = tiff_with_tile(64, 64, 16384)
    # Progressive JPEG with thousands of repeated scans (libjpeg decodes each one)
    prog = save(lesion(18, size=(64, 64)), "JPEG", progressive=True)
    out["hdr_jpeg_20000_scans.jpg"] = repeat_last_scan(prog, 20000)
    # WebP extended header declaring a 16384 x 16384 canvas around a small VP8L image
    lossless = save(small, "WEBP", lossless=True)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (16383).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + lossless[12:]
    out["hdr_webp_canvas.webp"] = b"RIFF" + struct.pack("<I", len(body)) + body
    w = bytearray(lossless)
    w[21:25] = struct.pack("<I", (16383) | (16383 << 14))  # VP8L width-1/height-1 bit fields
    out["hdr_webp_vp8l_16384.webp"] = bytes(w)
    # Refused formats with absurd headers (must be refused by the allow-list, not parsed)
    out["hdr_gif.gif"] = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00" + b"," + bytes(8) + b"\x00;"
    out["hdr_psd.psd"] = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 300000, 300000, 8, 3) + bytes(16)
    out["hdr_pcx.pcx"] = bytes([10, 5, 1, 8]) + struct.pack("<HHHH", 0, 0, 65535, 65535) + bytes(116) + bytes(64)
    out["hdr_sgi.sgi"] = struct.pack(">HBBHHHH", 474, 0, 1, 3, 65535, 65535, 3) + bytes(500)
    out["hdr_tga.tga"] = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, 65535, 65535, 24, 0) + bytes(64)
    out["hdr_qoi.qoi"] = b"qoif" + struct.pack(">IIBB", 100000, 100000, 3, 0) + bytes(16)
    out["hdr_dds.dds"] = b"DDS " + struct.pack("<7I", 124, 0x1007, 65535, 65535, 0, 0, 0) + bytes(200)
    out["hdr_ico.ico"] = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, 40, 22) + bytes(40)
    out["hdr_ppm_maxval0.ppm"] = b"P6\n4 4\n0\n" + bytes(48)
    out["hdr_ppm_huge.ppm"] = b"P6\n100000 100000\n255\n" + bytes(64)
    out["hdr_jp2.jp2"] = bytes.fromhex("0000000c6a5020200d0a870a") + bytes(64)
    out["hdr_eps.eps"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100000 100000\nshowpage\n"
    return out


def bombs() -> dict[str, bytes]:
    """Small files that really decode to enormous images."""
    out = {"bomb_png_1x64M_grey.png": png_raw(1, 64_000_000, zeros_stream(2 * 64_000_000)),
           "bomb_png_64Mx1_grey.png": png_raw(64_000_000, 1, zeros_stream(64_000_001)),
           "bomb_png_20000x20000.png": png_raw(20000, 20000, zeros_stream(20001 * 2000)),
           "bomb_png_7800x7800_rgba16.png": png_raw(7800, 7800, zeros_stream(7801 * 100), 16, 6)}
    # 8000 x 8000 float32 TIFF, deflate-compressed zeros: 256 MB decoded, over the pixel limit
    tif = Image.new("F", (8000, 8000))
    out["bomb_tiff_float_8000.tif"] = save(tif, "TIFF", compression="tiff_adobe_deflate")
    del tif
    gif = Image.new("P", (10000, 10000))
    out["bomb_gif_10000.gif"] = save(gif, "GIF")
    return out


def chunk_bombs() -> dict[str, bytes]:
    small = save(lesion(12, size=(32, 32)), "PNG")
    head, tail = small[:33], small[33:]
    big = zeros_stream(64 * 1024 * 1024)
    out = {
        "chunk_ztxt_64MB.png": head + png_chunk(b"zTXt", b"Comment\x00\x00" + big) + tail,
        "chunk_itxt_64MB.png": head + png_chunk(b"iTXt", b"Comment\x00\x01\x00\x00\x00" + big) + tail,
        "chunk_iccp_64MB.png": head + png_chunk(b"iCCP", b"icc\x00\x00" + big) + tail,
        "chunk_text_5000.png": head + b"".join(png_chunk(b"tEXt", b"k%d\x00v" % i) for i in range(5000)) + tail,
        "chunk_text_1MB.png": head + png_chunk(b"tEXt", b"Comment\x00" + b"A" * (1 << 20)) + tail,
        "chunk_bad_crc.png": head + b"\x00\x00\x00\x04tEXtabcd\x00\x00\x00\x00" + tail,
        "chunk_len_huge.png": head + struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"abc" + tail,
        "chunk_idat_split_1byte.png": head + b"".join(png_chunk(b"IDAT", bytes([c])) for c in
                                                      zlib.compress(bytes(33 * 32 * 3 + 32))) + png_chunk(b"IEND", b""),
        "chunk_exif_garbage.png": head + png_chunk(b"eXIf", b"MM\x00*" + bytes(4) + b"\xff" * 64) + tail,
    }
    jpeg = save(lesion(13, size=(32, 32)), "JPEG")
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + 40) + b"Exif\x00\x00" + b"MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(28)
    out["chunk_jpeg_bad_exif.jpg"] = jpeg[:2] + app1 + jpeg[2:]
    out["chunk_jpeg_64k_comments.jpg"] = jpeg[:2] + (b"\xff\xfe\xff\xff" + b"C" * 65533) * 120 + jpeg[2:]  # 7.9 MB, under the upload limit
    return out


def aspects() -> dict[str, bytes]:
    out = {}
    for w, h in ((1, 20000), (20000, 1), (2, 40000), (40000, 2), (10, 4000), (4000, 10), (1, 1), (3, 3), (100, 901)):
        out[f"aspect_{w}x{h}.png"] = save(Image.new("L", (w, h), 120), "PNG")
    out["aspect_1x6000.jpg"] = save(Image.new("RGB", (1, 6000), (200, 150, 140)), "JPEG")
    out["aspect_6000x1.bmp"] = save(Image.new("RGB", (6000, 1), (200, 150, 140)), "BMP")
    out["aspect_9x1.webp"] = save(Image.new("RGB", (900, 100), (200, 150, 140)), "WEBP")
    return out


def modes() -> dict[str, bytes]:
    src = lesion(14, size=(64, 48))
    grey = np.asarray(src.convert("L"))
    out = {}
    for mode in ("1", "L", "LA", "P", "RGBA", "I;16", "RGB"):
        out[f"mode_{mode.replace(';', '')}.png"] = save(src.convert(mode) if mode != "I;16"
                                                       else Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    for mode in ("CMYK", "YCbCr", "LAB", "I", "F", "L", "RGBA", "1"):
        img = src.convert(mode) if mode not in ("I", "F") else Image.fromarray(grey.astype(np.int32 if mode == "I" else np.float32))
        out[f"mode_{mode}.tif"] = save(img, "TIFF")
    for name, fill in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf), ("zero", 0.0), ("huge", 3e38),
                       ("negative", -5.0)):
        a = grey.astype(np.float32)
        a[:8] = fill if name in ("nan", "inf", "neginf") else a[:8]
        if name in ("zero", "huge", "negative"):
            a[:] = fill
        out[f"mode_F_{name}.tif"] = save(Image.fromarray(a), "TIFF")
    out["mode_F_all_nan.tif"] = save(Image.fromarray(np.full((32, 32), np.nan, np.float32)), "TIFF")
    for mode in ("CMYK", "L"):
        out[f"mode_{mode}.jpg"] = save(src.convert(mode), "JPEG")
    for mode in ("1", "L", "P", "RGB", "RGBA"):
        out[f"mode_{mode}.bmp"] = save(src.convert(mode), "BMP")
    out["mode_rgba.webp"] = save(src.convert("RGBA"), "WEBP")
    out["mode_L.webp"] = save(src.convert("L"), "WEBP")
    out["mode_tiff_jpeg.tif"] = save(src, "TIFF", compression="jpeg")
    out["mode_tiff_lzw.tif"] = save(src, "TIFF", compression="tiff_lzw")
    out["mode_tiff_packbits.tif"] = save(src, "TIFF", compression="packbits")
    out["mode_tiff_multipage.tif"] = save(src, "TIFF", save_all=True, append_images=[src.convert("L")] * 3)
    out["mode_webp_animated.webp"] = save(src, "WEBP", save_all=True, append_images=[lesion(15, size=(64, 48))])
    # BMP with RLE8 compression declared over raw data
    bmp = bytearray(save(src.convert("P"), "BMP"))
    bmp[30:34] = struct.pack("<I", 1)
    out["mode_bmp_rle8_bogus.bmp"] = bytes(bmp)
    exif = Image.Exif()
    for orientation in (0, 3, 6, 9, 255):
        exif[0x0112] = orientation
        out[f"mode_exif_orient_{orientation}.jpg"] = save(src, "JPEG", exif=exif)
    return out


def refused_formats() -> dict[str, bytes]:
    src = lesion(16, size=(64, 48))
    out = {}
    for fmt, ext, mode in (("GIF", "gif", "RGB"), ("PCX", "pcx", "RGB"), ("SGI", "sgi", "RGB"), ("TGA", "tga", "RGB"),
                           ("ICO", "ico", "RGB"), ("PPM", "ppm", "RGB"), ("IM", "im", "RGB"), ("SPIDER", "spi", "F"),
                           ("XBM", "xbm", "1"), ("DDS", "dds", "RGB"), ("QOI", "qoi", "RGB"), ("MSP", "msp", "1"),
                           ("BLP", "blp", "P"), ("PDF", "pdf", "RGB"), ("JPEG2000", "jp2", "RGB"), ("ICNS", "icns", "RGB"),
                           ("EPS", "eps", "RGB"), ("DIB", "dib", "RGB")):
        try:
            out[f"fmt_{fmt.lower()}.{ext}"] = save(src.convert(mode), fmt)
        except (OSError, KeyError, ValueError):  # no encoder here (e.g. EPS without Ghostscript)
            continue
    # A valid GIF and PCX renamed to .jpg: the content decides, not the name
    out["fmt_gif_named.jpg"] = save(src, "GIF")
    out["fmt_pcx_named.png"] = save(src, "PCX")
    out["fmt_eps_ghostscript.jpg"] = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
                                      b"(%pipe%id) (w) file\nshowpage\n")
    return out


def fakes() -> dict[str, bytes]:
    rng = random.Random(0)
    zipped = io.BytesIO()
    import zipfile
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "hello")
    out = {
        "fake_empty.jpg": b"",
        "fake_one_byte.jpg": b"\xff",
        "fake_jpeg_magic_only.jpg": b"\xff\xd8\xff",
        "fake_png_magic_only.png": b"\x89PNG\r\n\x1a\n",
        "fake_pdf.jpg": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "fake_zip.png": zipped.getvalue(),
        "fake_html.jpg": b"<html><script>alert(1)</script></html>",
        "fake_svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="10" height="10"/></svg>',
        "fake_elf.jpg": b"\x7fELF\x02\x01\x01" + bytes(120),
        "fake_text.jpg": b"This is not an image.\n" * 100,
        "fake_json.png": b'{"image": "no"}',
        "fake_nul.jpg": bytes(4096),
        "fake_ff.jpg": b"\xff" * 4096,
        "fake_utf16.png": "not an image".encode("utf-16"),
        "fake_gzip.jpg": b"\x1f\x8b\x08\x00" + bytes(64),
    }
    for i in range(12):
        out[f"fake_random_{i:02d}.jpg"] = bytes(rng.getrandbits(8) for _ in range(rng.choice((16, 256, 4096))))
    return out


def polyglots(valid: dict[str, bytes]) -> dict[str, bytes]:
    zipped = io.BytesIO()
    import zipfile
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("evil.class", b"\xca\xfe\xba\xbe")
    jpeg, png = valid["valid_baseline.jpg"], valid["valid.png"]
    script = b"<script>alert(document.domain)</script>"
    return {
        "poly_jpeg_zip.jpg": jpeg + zipped.getvalue(),
        "poly_png_html.png": png + b"<html>" + script + b"</html>",
        "poly_gifar.gif": save(lesion(17, size=(32, 32)), "GIF") + zipped.getvalue(),
        "poly_jpeg_comment_script.jpg": jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(script) + 2) + script + jpeg[2:],
        "poly_png_text_script.png": png[:33] + png_chunk(b"tEXt", b"Comment\x00" + script) + png[33:],
        "poly_html_then_png.png": b"<!--" + png,
        "poly_pdf_then_jpeg.jpg": b"%PDF-1.4\n" + jpeg,
        "poly_two_jpegs.jpg": jpeg + valid["valid_progressive.jpg"],
        "poly_png_after_iend.png": png + png,
        "poly_bmp_zip.bmp": valid["valid.bmp"] + zipped.getvalue(),
    }


def mutations(valid: dict[str, bytes], n: int = 260, seed: int = 0) -> dict[str, bytes]:
    """Seeded random damage to valid files: byte flips, insertions, deletions and splices."""
    rng = random.Random(seed)
    names = sorted(n for n in valid if "large" not in n)
    out = {}
    for i in range(n):
        name = names[i % len(names)]
        data = bytearray(valid[name])
        for _ in range(rng.choice((1, 2, 4, 16, 64))):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.6:
                data[pos] = rng.getrandbits(8)
            elif op < 0.75:
                data[pos:pos] = bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 4, 100))))
            elif op < 0.9:
                del data[pos:pos + rng.choice((1, 8, 200))]
            else:
                other = valid[rng.choice(names)]
                cut = rng.randrange(len(other))
                data[pos:] = other[cut:]
        out[f"mut_{i:03d}_{name}"] = bytes(data)
    return out


def corpus() -> dict[str, bytes]:
    """Every hostile file, plus the valid ones (which must still be classified)."""
    valid = valid_files()
    files = {**valid}
    for part in (truncations(valid), header_sizes(), bombs(), chunk_bombs(), metadata_bombs(), aspects(), modes(),
                 refused_formats(), fakes(), polyglots(valid), mutations(valid)):
        files.update(part)
    return files


if __name__ == "__main__":  # python -m tests.hostile DIR: write the corpus out for manual use
    import sys
    from pathlib import Path
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    for file_name, blob in corpus().items():
        (target / file_name).write_bytes(blob)
    print(f"{len(corpus())} files in {target}")
