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


def test_real_metadata_is_not_mistaken_for_a_crafted_one():
    """EXIF with an orientation and a thumbnail-sized block, an ICC profile, a TIFF with its own
    tags: all decode, and each value is counted once."""
    from edge.preprocess import tiff_tag_bytes
    img = lesion_image(5, size=(120, 90))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 5000  # ImageDescription, stored outside its entry
    icc = bytes(range(256)) * 2000
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        buf = io.BytesIO()
        img.save(buf, fmt, exif=exif, icc_profile=icc)
        out = open_image(buf.getvalue())
        assert out.size == (90, 120), fmt  # turned by the orientation tag
    tif = io.BytesIO()
    img.save(tif, "TIFF", icc_profile=icc, description="y" * 5000)
    assert 512_000 + 5000 <= tiff_tag_bytes(tif.getvalue()) <= len(tif.getvalue())


def test_jpeg_scans_are_counted_in_the_main_image_only():
    """A thumbnail inside the EXIF block and a second picture after the end (MPO) are not scans
    libjpeg decodes; a progressive JPEG's scans are."""
    from edge.preprocess import jpeg_segments

    from .hostile import amplified_ifd, jpeg_with_segment
    thumb = jpeg_bytes(lesion_image(1, size=(32, 24)), progressive=True)
    with_thumb = jpeg_with_segment(0xE1, b"Exif\x00\x00" + amplified_ifd(0, 16)[0] + thumb)
    assert jpeg_segments(with_thumb)[1] == 1
    assert jpeg_segments(with_thumb + jpeg_bytes(lesion_image(2), progressive=True))[1] == 1
    assert jpeg_segments(jpeg_bytes(lesion_image(3), progressive=True))[1] > 3


def test_sequential_jpeg_in_several_scans_counts_full_size_coefficients():
    """One scan per component (not interleaved): libjpeg keeps the whole image's coefficients even
    at a 1/8 draft (a 7200 x 7200 CMYK file of 2.4 MB was estimated at 3 MB and took 400 MB)."""
    from edge.preprocess import DecodeLimits, check_scans, peak_bytes

    from .hostile import multiscan_jpeg
    data = multiscan_jpeg(4992)
    img = Image.open(io.BytesIO(data))
    assert check_scans(io.BytesIO(data), img, "x", DecodeLimits()) == 3
    img.draft("RGB", (448, 448))
    assert peak_bytes(img, (4992, 4992), scans=3) >= 4992 * 4992 * 2 * 3
    with pytest.raises(ImageError, match="would need over 100 MB"):
        open_image(data, draft_size=(224, 224), limits=DecodeLimits(max_decode_bytes=100 << 20))
    assert open_image(multiscan_jpeg(64), draft_size=(224, 224)).size == (64, 64)  # small ones still decode


def test_png_metadata_over_pillows_chunk_limit_is_named():
    """A 2 MB colour profile is over Pillow's PNG chunk limit: say so, not "damaged"."""
    buf = io.BytesIO()
    lesion_image(6).save(buf, "PNG", icc_profile=bytes(2 << 20))
    with pytest.raises(ImageError, match="colour-profile chunk"):
        open_image(buf.getvalue())
