"""Every image file goes through data.open_image: any mode PIL opens comes out as 8-bit RGB
scaled by its real bit range; what cannot be used (undecodable, truncated, empty, too large) is
skipped with a warning that says why, in training, evaluation and tools/predict.py alike."""
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import clip
from clip.image import to_rgb
import data
import train
from conftest import folder_dataset, make_tiny_clip

RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


def rgb(path):
    return np.asarray(data.open_image(str(path)))  # (H, W, 3) uint8


def png16_rgb(path, pixels):
    """A 16-bit RGB PNG (PIL cannot write one): `pixels` (H, W, 3) uint16."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + \
            struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return str(path)


def bomb(path, width, height):
    """A small real PNG whose header declares width x height (IHDR patched, CRC redone)."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    raw = bytearray(open(path, "rb").read())
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    open(path, "wb").write(bytes(raw))
    return str(path)


# (file name, how to write it from RAMP, the gray values open_image must return)
WIDE = {
    "i16.png": lambda p: Image.fromarray(RAMP.astype(np.uint16) * 257).save(p),
    "i16b.tif": lambda p: Image.frombytes("I;16B", (16, 16),
                                          (RAMP.astype(">u2") * 257).tobytes()).save(p),
    "i32.tif": lambda p: Image.fromarray(RAMP.astype(np.int32) * 257).save(p),
    "i32_over.tif": lambda p: Image.fromarray(RAMP.astype(np.int32) * 257 * 4 - 70000).save(p),
    "f01.tif": lambda p: Image.fromarray(RAMP.astype(np.float32) / 255).save(p),
    "f255.tif": lambda p: Image.fromarray(RAMP.astype(np.float32)).save(p),
    "f_any.tif": lambda p: Image.fromarray(RAMP.astype(np.float32) * 4 - 100).save(p),
}


@pytest.mark.parametrize("name", list(WIDE))
def test_wide_modes_are_scaled_by_their_bit_range(tmp_path, name):
    WIDE[name](tmp_path / name)
    with Image.open(tmp_path / name) as im:
        assert im.mode in ("I;16", "I;16B", "I", "F")  # what the file really holds
    out = rgb(tmp_path / name)
    assert out.shape == (16, 16, 3)
    if name == "i32_over.tif":  # 'I' is read as 16-bit data: clipped to 0..65535, not stretched
        expected = np.clip(RAMP.astype(np.int64) * 257 * 4 - 70000, 0, 65535)
        expected = np.rint(expected / 257).astype(np.uint8)
    else:
        expected = RAMP
    assert np.array_equal(out[..., 0], expected) and (out == out[..., :1]).all()


def test_float_edge_cases():
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="no finite pixel values"):
        to_rgb(Image.fromarray(nan))
    nan[0, 0], nan[0, 1], nan[1, 1] = -3.0, 7.0, np.inf  # range -3..7: min-max
    out = np.asarray(to_rgb(Image.fromarray(nan)))[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[1, 1] == 255 and out[2, 2] == 0
    const = np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 300, np.float32))))
    assert (const == 0).all()  # a constant with no white point: black, not a division by zero


def test_16bit_rgb_png_and_8bit_modes(tmp_path):
    colour = np.zeros((6, 6, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    assert (rgb(png16_rgb(tmp_path / "rgb16.png", colour.astype(np.uint16) * 257)) == colour).all()
    base = Image.fromarray(colour)
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    base.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.new("LA", (6, 6), (100, 50)).save(tmp_path / "la.png")
    Image.new("1", (6, 6), 1).save(tmp_path / "one.png")
    for name in ("rgba.png", "p.png", "cmyk.jpg"):
        assert np.abs(rgb(tmp_path / name).astype(int) - colour).max() <= 2, name
    assert (rgb(tmp_path / "la.png") == 100).all() and (rgb(tmp_path / "one.png") == 255).all()


def test_in_memory_modes_through_clip_preprocess():
    """clip.preprocess takes already-open images of any mode: 16-bit gives the 8-bit result,
    premultiplied La works, a palette with byte transparency gives no PIL warning."""
    t = clip.preprocess(16)
    gray = Image.fromarray(RAMP)
    assert torch.equal(t(Image.fromarray(RAMP.astype(np.uint16) * 257)), t(gray))
    assert torch.equal(t(gray.convert("LA").convert("La")), t(gray))
    palette = gray.convert("P")
    palette.info["transparency"] = bytes(256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(t(palette), t(gray))


def test_16bit_dataset_gives_the_same_tensors_as_8bit(tmp_path):
    """The observed bug: 16-bit PNGs became all-white images. The same pictures stored in 8 and
    in 16 bits give equal tensors, in the test and the (seeded) training loader."""
    rng = np.random.default_rng(0)
    for bits in (8, 16):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / str(bits) / c)
            for i in range(4):
                pixels = rng.integers(0, 256, (24, 24), dtype=np.uint8) if bits == 8 else \
                    np.asarray(Image.open(tmp_path / "8" / c / f"{i}.png")).astype(np.uint16) * 257
                Image.fromarray(pixels).save(tmp_path / str(bits) / c / f"{i}.png")
    batches = {}
    for bits in (8, 16):
        ds = data.load("folder", tmp_path / str(bits), shots=-1)
        items = ds.train + ds.val + ds.test
        train_loader = data.make_loader(items, 16, 4, True)
        train_loader.set_epoch(3, 0)  # seeded order, crops and flips, as train.py sets per epoch
        batches[bits] = [x for loader in (data.make_loader(items, 16, 4, False), train_loader)
                         for x, _ in loader]
    for a, b in zip(batches[8], batches[16]):
        assert torch.equal(a, b)
    assert batches[16][0].std() > 0.1  # not a constant (all-white) batch


def test_first_frame_and_exif_orientation(tmp_path):
    red, blue = (Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255)))
    red.save(tmp_path / "anim.gif", save_all=True, append_images=[blue], duration=50)
    assert (rgb(tmp_path / "anim.gif") == (255, 0, 0)).all()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert data.open_image(str(tmp_path / "phone.jpg")).size == (20, 40)


def test_files_that_are_not_usable_images_name_the_reason(tmp_path):
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "ok.png")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    os.mkdir(tmp_path / "folder.jpg")
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "nan.tif")
    cases = {"truncated.png": "truncated", "empty.png": r"empty \(0 bytes\)",
             "text.jpg": "cannot identify", "folder.jpg": "IsADirectoryError",
             "missing.jpg": "FileNotFoundError", "nan.tif": "no finite pixel values"}
    for name, why in cases.items():
        with pytest.raises(data.ImageError, match=why):
            data.open_image(str(tmp_path / name))
    loader = data.make_loader([(str(tmp_path / n), 0) for n in ["ok.png", *cases]], 16, 4, False)
    with pytest.warns(UserWarning) as record:
        (images, labels), = list(loader)
    assert len(labels) == 1 and len(loader.skipped) == len(cases)
    text = "\n".join(str(w.message) for w in record)
    assert all(name in text for name in cases) and "truncated" in text


def test_too_large_images_are_skipped_from_their_header(tmp_path, monkeypatch):
    huge = bomb(tmp_path / "huge.png", 20000, 20000)  # PIL: DecompressionBombError
    over = bomb(tmp_path / "over.png", 10001, 10000)  # under PIL's error, over MAX_PIXELS
    for path in (huge, over):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's DecompressionBombWarning stays inside
            with pytest.raises(data.ImageError, match=r"too large.*100,000,000"):
                data.open_image(path)
    Image.new("RGB", (40, 25)).save(tmp_path / "small.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 1000)
    assert data.open_image(str(tmp_path / "small.png")).size == (40, 25)  # exactly the limit
    monkeypatch.setattr(data, "MAX_PIXELS", 999)
    with pytest.raises(data.ImageError, match="40 x 25 = 1,000 pixels"):
        data.open_image(str(tmp_path / "small.png"))
    monkeypatch.setattr(data, "MAX_PIXELS", 10**8)
    Image.new("RGB", (100, 1)).save(tmp_path / "strip.png")
    Image.new("RGB", (1, 101)).save(tmp_path / "thinner.png")
    assert data.open_image(str(tmp_path / "strip.png")).size == (100, 1)  # exactly MAX_ASPECT
    with pytest.raises(data.ImageError, match=r"too thin: 1 x 101.*data.MAX_ASPECT"):
        data.open_image(str(tmp_path / "thinner.png"))  # 1 x 100000 would fill gigabytes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a user's lower PIL limit: also skipped
    with pytest.raises(data.ImageError, match="too large for PIL: .* exceeds limit of 200"):
        data.open_image(str(tmp_path / "small.png"))


def test_a_huge_test_image_does_not_stop_the_run_after_training(tmp_path):
    """The observed failure: a 20000x20000 PNG among the test images raised after training, and
    --resume raised again. Now it is skipped, counted and the run finishes."""
    torch.save(make_tiny_clip().state_dict(), tmp_path / "tiny.pt")
    root = folder_dataset(tmp_path / "pets", ["cat", "dog"])
    test_image = data.load("folder", root).test[0][0]  # writes the split: the test images
    bomb(test_image, 20000, 20000)
    with pytest.warns(UserWarning, match="too large"):
        res = train.main(["--dataset", "folder", "--root", root, "--backbone",
                          str(tmp_path / "tiny.pt"), "--protocol", "fewshot", "--shots", "2",
                          "--epochs", "1", "--batch-size", "2", "--device", "cpu",
                          "--out", str(tmp_path / "out")])
    assert res["skipped_images"] == 1 and set(res["accuracy"]) == {"all"}
