"""edge.preprocess: modes, orientation, resize policy, bad files, and train == inference."""
import io

import numpy as np
import pytest
from PIL import Image

from edge.preprocess import ImageError, PreprocessSpec, open_image, preprocess

from .conftest import jpeg_bytes, lesion_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "RGB"])
def test_every_mode_becomes_rgb(mode):
    src = lesion_image(0)
    grey = np.asarray(src.convert("L"))
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(grey.astype(np.int32) * 1000)
    else:
        img = src.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "PNG" if mode not in ("CMYK", "I") else "TIFF")
    x = preprocess(buf.getvalue(), PreprocessSpec(size=(20, 30)))
    assert x.shape == (20, 30, 3) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 255
    assert x.max() > 100  # not crushed to black (I;16 is scaled by its range, not clipped)


def test_i16_scaled_not_clipped():
    a = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    x = preprocess(buf.getvalue(), PreprocessSpec(size=(8, 8)))
    assert abs(float(x.mean()) - 128) < 2


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = open_image(buf.getvalue())
    assert out.size == (20, 40)  # portrait after transpose
    a = np.asarray(out, np.float32).mean(axis=(1, 2))
    assert a[:15].mean() > 200 and a[-15:].mean() < 50  # white half is now on top


def test_resize_policies_differ():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red band on the far left
    data = jpeg_bytes(img, quality=95)
    squash = preprocess(data, PreprocessSpec(size=(32, 32), resize="squash"))
    crop = preprocess(data, PreprocessSpec(size=(32, 32), resize="center_crop"))
    assert squash[:, :4, 0].mean() > 200  # the band survives squashing
    assert crop[:, :4, 0].mean() < 60  # and is cropped away by centre crop


def test_large_jpeg_uses_draft_and_matches_target(monkeypatch):
    """A large JPEG is decoded at a reduced DCT scale (draft), asked for at twice the target."""
    from PIL import JpegImagePlugin
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size, *a, **k):
        calls.append((mode, size))
        return real(self, mode, size, *a, **k)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    img = lesion_image(1, size=(3000, 2000))
    x = preprocess(jpeg_bytes(img), PreprocessSpec(size=(224, 224)))
    assert x.shape == (224, 224, 3)
    assert calls == [("RGB", (448, 448))]


def test_large_png_is_reduced_before_conversion(monkeypatch):
    """Other formats are box-reduced right after decoding (the memory bound relies on it)."""
    calls = []
    real = Image.Image.reduce

    def spy(self, factor, *a, **k):
        calls.append(factor)
        return real(self, factor, *a, **k)
    monkeypatch.setattr(Image.Image, "reduce", spy)
    buf = io.BytesIO()
    lesion_image(2, size=(2000, 1000)).save(buf, "PNG")
    assert preprocess(buf.getvalue(), PreprocessSpec(size=(224, 224))).shape == (224, 224, 3)
    assert calls == [2]  # 2000 // 448 = 4, 1000 // 448 = 2: no smaller than twice the target


@pytest.mark.parametrize("data,msg", [(b"", "empty"), (b"not an image at all", "not an image"),
                                      (jpeg_bytes(lesion_image(2))[:300], "truncated")])
def test_bad_inputs_raise_image_error(data, msg):
    with pytest.raises(ImageError, match=msg):
        preprocess(data)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "nope.jpg")


def test_decompression_bomb_refused_before_decoding():
    data = jpeg_bytes(Image.new("RGB", (400, 300)))
    with pytest.raises(ImageError, match="over the limit"):
        preprocess(data, max_pixels=100_000)


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(size=(96, 128), resize="center_crop")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        PreprocessSpec(resize="stretch")


def test_training_pipeline_gives_identical_arrays(isic_csv_dir, tmp_path):
    """The training cache is built by edge.preprocess: same file, same array, bit for bit."""
    from train import data as D
    ds = D.read_source(isic_csv_dir)
    spec = PreprocessSpec(size=(48, 48))
    pixels, bad = D.build_pixel_cache(ds.rows, spec, tmp_path / "cache", workers=1)
    assert len(bad) == 0
    for i in (0, 7, 39):
        inference = preprocess(ds.rows["path"].iloc[i], spec)
        np.testing.assert_array_equal(np.asarray(pixels[i], np.float32), inference)


def test_fuzzed_inputs_decode_or_raise_image_error():
    """A short run of the fuzz property (tests/fuzz_open_image.py runs it for minutes)."""
    from .fuzz_open_image import fuzz
    fuzz(examples=300, seed=0)


def test_largest_phone_photos_are_accepted():
    """A 50 Mpx sensor (8192 x 6144) is under the pixel limit (a flat frame: quick to encode)."""
    img = Image.new("RGB", (8192, 6144), (180, 120, 100))
    assert preprocess(jpeg_bytes(img, quality=50)).shape == (224, 224, 3)


def test_grey_band_in_a_real_photo_is_not_mistaken_for_missing_data():
    a = np.asarray(Image.effect_noise((600, 480), 60).convert("RGB")).copy()
    a[-80:] = 128  # the bottom sixth exactly mid-grey, as libjpeg pads a short file
    assert preprocess(jpeg_bytes(Image.fromarray(a), quality=100)).shape == (224, 224, 3)


def test_jpeg_claiming_more_rows_than_it_holds_is_refused():
    import struct
    data = bytearray(jpeg_bytes(lesion_image(3, size=(16, 16))))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 4000, 6000)
    with pytest.raises(ImageError, match="less image data than its header declares"):
        preprocess(bytes(data))


def test_progressive_jpeg_memory_counts_full_size_coefficients():
    from edge.preprocess import peak_bytes
    img = lesion_image(4, size=(800, 600))
    base = Image.open(io.BytesIO(jpeg_bytes(img)))
    prog = Image.open(io.BytesIO(jpeg_bytes(img, progressive=True)))
    for im in (base, prog):
        im.draft("RGB", (100, 100))
    assert peak_bytes(prog, (800, 600)) - peak_bytes(base, (800, 600)) == 800 * 600 * 2 * 3


def test_short_jpeg_is_refused_when_rotated_too():
    """The padding check runs before the EXIF turn (portrait phone photos carry orientation 6)."""
    import struct
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(jpeg_bytes(lesion_image(3, size=(16, 16)), exif=exif))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 4000, 6000)
    with pytest.raises(ImageError, match="less image data than its header declares"):
        preprocess(bytes(data))


# --------------------------------------------------------------------------- metadata and scans
def _peak_python_bytes(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("name", ["meta_tiff_300_tags_on_4MB.tif", "meta_png_exif_300_tags_on_4MB.png",
                                  "meta_webp_exif_300_tags_on_4MB.webp", "meta_jpeg_exif_2700_tags_on_32KB.jpg",
                                  "meta_jpeg_mpf_2700_tags_on_32KB.jpg"])
def test_metadata_whose_tags_share_one_block_is_refused_before_pillow_copies_it(name):
    """Pillow copies a tag's value once per tag that points at it, while opening the file (TIFF,
    JPEG EXIF and MPF) or reading the EXIF orientation (PNG, WebP): 300 tags on one 4 MB block
    took 1.2 GB (a 10 MB TIFF took a server to 3.2 GB)."""
    from .hostile import metadata_bombs
    data = metadata_bombs()[name]

    def attempt():
        with pytest.raises(ImageError, match="crafted or damaged metadata"):
            open_image(data, draft_size=(224, 224))
    assert _peak_python_bytes(attempt) < 3 * len(data) + (8 << 20)


def _tags_on_one_block(n_tags: int, payload: int, magic: bytes = b"II*\x00") -> bytes:
    """A TIFF structure with n BYTE tags on one payload, under any of the headers Pillow accepts."""
    from .hostile import amplified_ifd
    data, _ = amplified_ifd(n_tags, payload)
    if magic[:2] == b"MM":  # same layout, big-endian numbers
        import struct
        count = struct.unpack("<H", data[8:10])[0]
        entries = b"".join(struct.pack(">HHII", *struct.unpack("<HHII", data[10 + 12 * i:22 + 12 * i])) for i in range(count))
        data = b"MM" + data[2:4] + struct.pack(">I", 8) + struct.pack(">H", count) + entries + data[10 + 12 * count:]
    return magic + data[4:]


def _crafted_metadata_cases() -> dict[str, bytes]:
    """Ways around a check of the containers (found by review): each makes Pillow copy >= 100 MB."""
    import struct
    import zlib

    from .hostile import amplified_ifd, jpeg_with_segment, lesion, png_chunk, save
    img = lesion(15, size=(64, 48))
    block = _tags_on_one_block(100, 1 << 20)
    seg_block = _tags_on_one_block(2000, 28000)
    jpeg, png = save(img, "JPEG"), save(img, "PNG")
    app1 = [b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(part)) + b"Exif\x00\x00" + part
            for part in (seg_block[i:i + 60000] for i in range(0, len(seg_block), 60000))]
    strips = [(256, 3, 64), (257, 3, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 3, 1)]
    many_strips, at = amplified_ifd(0, 250_000 * 4, strips)
    many_strips = many_strips.replace(struct.pack("<H", len(strips)), struct.pack("<H", len(strips) + 1), 1)
    many_strips = many_strips[:10 + 12 * len(strips)] + struct.pack("<HHII", 273, 4, 250_000, at + 12) \
        + many_strips[10 + 12 * len(strips):]
    exif_ifd, _ = amplified_ifd(100, 1 << 20)
    return {
        "png_double_exif_prefix": save(img, "PNG", exif=b"Exif\x00\x00Exif\x00\x00" + block),
        "webp_double_exif_prefix": save(img, "WEBP", exif=b"Exif\x00\x00Exif\x00\x00" + block),
        "jpeg_exif_over_17_app1_segments": jpeg[:2] + b"".join(app1) + jpeg[2:],
        "jpeg_exif_after_an_early_eoi": jpeg[:2] + b"\xff\xd9" + jpeg_with_segment(0xE1, b"Exif\x00\x00" + seg_block[:60000])[2:],
        "jpeg_exif_II0star_header": jpeg_with_segment(0xE1, b"Exif\x00\x00" + _tags_on_one_block(2000, 28000, b"II\x00*")[:60000]),
        "tiff_II0star": _tags_on_one_block(100, 1 << 20, b"II\x00*"),
        "tiff_MMstar0": _tags_on_one_block(100, 1 << 20, b"MM*\x00"),
        "tiff_MM0plus": _tags_on_one_block(100, 1 << 20, b"MM\x00+"),
        "png_raw_profile_exif": png[:33] + png_chunk(b"zTXt", b"Raw profile type exif\x00\x00" + zlib.compress(
            b"\nexif\n%8d\n" % (6 + len(seg_block)) + (b"Exif\x00\x00" + seg_block).hex().encode())) + png[33:],
        "tiff_250k_strips": many_strips,
        "tiff_exif_subdirectory": _tiff_with_exif_ifd(exif_ifd),
    }


def _tiff_with_exif_ifd(sub: bytes) -> bytes:
    """A 64 x 64 grey TIFF whose ExifIFD (34665) is `sub` (a TIFF structure, rebased)."""
    import struct
    tags = [(256, 3, 64), (257, 3, 64), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 3, 64), (279, 4, 4096), (34665, 4, 0)]
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    pixels_at, sub_at = ifd_end, ifd_end + 4096
    entries = b""
    for tag, kind, value in tags:
        value = {273: pixels_at, 34665: sub_at + 8}.get(tag, value)
        entries += struct.pack("<HHIHH" if kind == 3 else "<HHII", tag, kind, 1, value, *((0,) if kind == 3 else ()))
    count = struct.unpack("<H", sub[8:10])[0]  # rebase the sub-directory's value offsets
    body = b"".join(struct.pack("<HHII", t, k, c, o + sub_at) for t, k, c, o in
                    (struct.unpack("<HHII", sub[10 + 12 * i:22 + 12 * i]) for i in range(count)))
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries + bytes(4) + bytes(4096)
            + sub[:10] + body + sub[10 + 12 * count:])


@pytest.mark.parametrize("case", sorted(_crafted_metadata_cases()))
def test_every_directory_pillow_loads_is_guarded(case):
    """Whatever the container (split EXIF, repeated prefixes, the four TIFF headers, sub-directories,
    PNG text EXIF, markers before the scan), a directory that would cost far more than the file is
    left unread and the file refused; so are tens of thousands of strips."""
    data = _crafted_metadata_cases()[case]

    def attempt():
        with pytest.raises(ImageError, match="crafted or damaged metadata|strips or tiles|over the 1 MB"):
            open_image(data, draft_size=(224, 224))
    assert _peak_python_bytes(attempt) < 3 * len(data) + (8 << 20)


def test_many_jpeg_segments_are_refused_before_pillow_lists_them():
    jpeg = jpeg_bytes(lesion_image(1, size=(32, 24)))
    with pytest.raises(ImageError, match="metadata segments"):
        open_image(jpeg[:2] + b"\xff\xfe\x00\x02" * 5000 + jpeg[2:])
    assert open_image(jpeg[:2] + b"\xff\xfe\x00\x02" * 100 + jpeg[2:]).size == (32, 24)


def test_real_metadata_is_not_mistaken_for_a_crafted_one():
    """EXIF with an orientation, a 5 KB description, Exif and GPS sub-directories and a 60 KB maker
    note, a 512 KB ICC profile, a TIFF with its own tags: all decode, each value counted once."""
    from edge.preprocess import ifd_cost
    img = lesion_image(5, size=(120, 90))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 5000  # ImageDescription, stored outside its entry
    camera = exif.get_ifd(0x8769)  # a phone's Exif sub-directory: exposure, a 60 KB maker note
    camera[0x829A], camera[0x8827], camera[0x927C] = 0.004, 100, b"M" * 60000
    exif.get_ifd(0x8825)[2] = (52.0, 30.0, 12.5)  # GPS latitude
    icc = bytes(range(256)) * 2000
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        img.save(buf, fmt, exif=exif, icc_profile=icc)
        out = open_image(buf.getvalue())
        assert out.size == (90, 120), fmt  # turned by the orientation tag
    tif = io.BytesIO()
    img.save(tif, "TIFF", icc_profile=icc, description="y" * 5000)
    tif.seek(int.from_bytes(tif.getvalue()[4:8], "little"))
    cost, strips = ifd_cost(tif, little=True, big=False)
    assert 512_000 + 5000 <= cost <= len(tif.getvalue()) and 1 <= strips < 100


def test_jpeg_scans_are_counted_in_the_main_image_only():
    """A thumbnail inside the EXIF block and a second picture after the end (MPO) are not scans
    libjpeg decodes; a progressive JPEG's scans are."""
    from edge.preprocess import jpeg_layout

    from .hostile import amplified_ifd, jpeg_with_segment
    thumb = jpeg_bytes(lesion_image(1, size=(32, 24)), progressive=True)
    with_thumb = jpeg_with_segment(0xE1, b"Exif\x00\x00" + amplified_ifd(0, 16)[0] + thumb)
    assert jpeg_layout(with_thumb).scans == 1 and not jpeg_layout(with_thumb).whole_image_coefficients
    after = jpeg_layout(with_thumb + jpeg_bytes(lesion_image(2), progressive=True))
    assert after.scans == 1 and not after.whole_image_coefficients
    progressive = jpeg_layout(jpeg_bytes(lesion_image(3), progressive=True))
    assert progressive.scans > 3 and progressive.whole_image_coefficients


def test_sequential_jpeg_in_several_scans_counts_full_size_coefficients():
    """One scan per component (not interleaved), or a first scan that covers one component only:
    libjpeg keeps the whole image's coefficients even at a 1/8 draft (a 7200 x 7200 CMYK file of
    2.4 MB was estimated at 3 MB and took 400 MB)."""
    from edge.preprocess import DecodeLimits, jpeg_layout, peak_bytes

    from .hostile import multiscan_jpeg
    data = multiscan_jpeg(4992)
    first_scan_only = data[:data.find(b"\xff\xda", data.find(b"\xff\xda") + 1)] + b"\xff\xd9"
    assert jpeg_layout(data).scans == 3 and jpeg_layout(first_scan_only).scans == 1
    for case in (data, first_scan_only):
        assert jpeg_layout(case).whole_image_coefficients
        img = Image.open(io.BytesIO(case))
        img.draft("RGB", (448, 448))
        assert peak_bytes(img, (4992, 4992), True) >= 4992 * 4992 * 2 * 3
        with pytest.raises(ImageError, match="would need over 100 MB"):
            open_image(case, draft_size=(224, 224), limits=DecodeLimits(max_decode_bytes=100 << 20))
    assert open_image(multiscan_jpeg(64), draft_size=(224, 224)).size == (64, 64)  # small ones still decode


def test_png_metadata_over_pillows_chunk_limit_is_named():
    """A 2 MB colour profile is over Pillow's PNG chunk limit: say so, not "damaged"."""
    buf = io.BytesIO()
    lesion_image(6).save(buf, "PNG", icc_profile=bytes(2 << 20))
    with pytest.raises(ImageError, match="colour-profile chunk"):
        open_image(buf.getvalue())
