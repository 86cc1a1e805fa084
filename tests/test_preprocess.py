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
