"""Any PIL image -> the 8-bit RGB image CLIP's transform expects.

PIL's own convert("RGB") is right for the 8-bit modes (1, L, P, PA, LA, RGBA, RGBa, RGBX, CMYK,
YCbCr, LAB, HSV) but clips every wider pixel to 0..255, so a 16-bit image (0..65535) comes out
almost all white. to_rgb scales the wide modes to 8 bits first:

  16-bit integers (I;16, I;16B, I;16L, I;16N):  v8 = round(v / 257), 65535 -> 255 (the inverse of
                                                v8 * 257, the usual 8 -> 16-bit widening)
  32-bit integers (I):       read as 16-bit data, the common source of an 'I' image (PIL widens
                             16-bit pixels to 'I'): clipped to 0..65535, then as above. Values
                             are never rescaled per image, so dark stays dark.
  floats (F):                in [0, 1]: v * 255; else in [0, 255] (PIL's own scale, e.g.
                             convert("F") of an 8-bit image): v as is; else no white point is
                             known (a depth map, HDR data): min-max to 0..255 (a constant image:
                             black). NaN and -inf read as the smallest finite value, +inf as the
                             largest; an image without any finite value is a ValueError.

Transparency is dropped, as Dassl's read_image (KaiyangZhou/Dassl.pytorch:
dassl/utils/tools.py) drops it: pixels keep their stored colour. Premultiplied alpha (La, RGBa)
is undone first, and a palette with transparency goes through RGBA (PIL warns otherwise).
"""
import numpy as np
from PIL import Image

_16BIT = 65535


def _scale_integers(pixels):
    """Integer pixels read as 16-bit -> uint8: round(v / 257) = (v + 128) // 257 (257 is odd,
    so v / 257 is never exactly halfway and the integer form rounds the same)."""
    v = pixels.astype(np.int32).clip(0, _16BIT)
    return ((v + 128) // 257).astype(np.uint8)


def _scale_floats(pixels):
    """Float pixels -> uint8, by the range they lie in (module docstring)."""
    finite = np.isfinite(pixels)
    if not finite.any():
        raise ValueError("the image holds no finite pixel values (all NaN or inf)")
    lo, hi = float(pixels[finite].min()), float(pixels[finite].max())
    v = np.nan_to_num(pixels.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    if lo >= 0 and hi <= 1:
        v = v * 255
    elif lo < 0 or hi > 255:  # no white point known: min..max -> 0..255 (a constant: black)
        v = (v - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.rint(v).clip(0, 255).astype(np.uint8)


def to_rgb(image):
    """A PIL image of any mode -> an 8-bit RGB PIL image (the module docstring's rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;"):
        return Image.fromarray(_scale_integers(np.asarray(image)), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_scale_floats(np.asarray(image)), "L").convert("RGB")
    if mode == "La":  # PIL converts La only to LA
        image = image.convert("LA")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")
