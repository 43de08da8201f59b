"""Image file bytes -> the RGB pixels the tokenizer sees. Extraction, chat and tokenizer training all
read images through here, so one file gives the same pixels (and codes) everywhere (tokenizer training may
decode a large JPEG reduced, `min_side`: its random crops are resized down either way).

    load_image(bytes | path)          -> PIL RGB, first frame, alpha composited on white, fully decoded
    preprocess(img, mode, size)       -> uint8 (size, size, 3)
        generation     resize the short side to `size` (Lanczos, as Liquid's extractor), centre crop
        understanding  pad to square with PAD_COLOR, resize to size x size (bilinear) (REFERENCE 6.10)
        (beyond MAX_ASPECT, or a padded canvas over MAX_PIXELS, the image is first cropped / shrunk so that
        memory stays bounded; other images take exactly the path above)
    to_model_input([pixels])          -> float (B, 3, size, size) in [-1, 1]

Mode handling in `load_image` (the public crawls hold all of these):
    RGBA, LA, PA, P / L / RGB with a transparency entry  -> alpha-composited on white
    I;16*, I (16-bit PNG / TIFF)                          -> scaled 0..65535 -> 0..255, then gray -> RGB
    CMYK, L, 1, P, YCbCr                                  -> PIL's convert("RGB")
    animated GIF / WebP / multi-page TIFF                 -> the first frame
EXIF orientation is NOT applied, as in the LLaVA and Liquid readers the released models were trained
with. Truncated or damaged files raise (the whole image is decoded here, not lazily).
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PAD_COLOR = (122, 116, 104)  # LLaVA's expand2square background (CLIP mean * 255)
MAX_PIXELS = 40_000_000
"""Default limit on width x height: bigger files are refused before their pixels are decoded."""
MAX_ASPECT = 4
"""Short-side resizes (generation mode, the evaluation transform) keep at most this long:short ratio."""
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageTooLarge(ValueError):
    """The image has more pixels than the `max_pixels` limit (raised before decoding its pixels)."""

    def __init__(self, width: int | None, height: int | None, limit: int, detail: str = ""):
        self.width, self.height, self.limit = width, height, limit
        size = f"{width}x{height} = {width * height:,} pixels" if width is not None else detail
        super().__init__(f"image is {size}, over max_pixels={limit:,}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (a new image): transparency composited on white, 16-bit scaled to 8."""
    if img.mode.startswith("I"):  # "I" and "I;16*": 16-bit samples (PIL's own convert would clip at 255)
        a = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        t = img.info.get("transparency")
        if isinstance(t, int):  # a 16-bit tRNS names one raw value: those pixels composite to white
            gray[a == t] = 255
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def load_image(src: bytes | bytearray | memoryview | str | os.PathLike, max_pixels: int = MAX_PIXELS,
               min_side: int | None = None) -> Image.Image:
    """Decode image file bytes (or a file path) into a fully loaded RGB image (see the module docstring).

    `min_side` (tokenizer training only): a JPEG at least twice that on its short side is decoded at 1/2 or 1/4
    scale in the DCT domain, keeping the short side >= min_side: a 4032x3024 photo decodes ~3x faster for a
    256-px crop. Without it every pixel is decoded.

    Raises PIL.UnidentifiedImageError (not an image), OSError (truncated / damaged) or ImageTooLarge
    (a ValueError naming `max_pixels`)."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src)
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own limit (an error at twice it) must not undercut a larger one
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:  # over twice PIL's limit, so over max_pixels: too large, not damaged
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(None, None, max_pixels, f"{int(n[1]):,} pixels" if n else str(e)) from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise ImageTooLarge(w, h, max_pixels)
        # (an MPO is a JPEG with a second image inside: most phone photos, gain or depth maps; frame 0 is the JPEG)
        if min_side and img.format in ("JPEG", "MPO") and min(w, h) >= 2 * min_side:
            # the largest reduction leaving at least min_side, at most 1/4 (1/8 keeps only each block's mean)
            k = min(min(w, h) / min_side, 4)
            img.draft(None, (int(w / k), int(h / k)))
        # (frame 0 is the one open: counting frames would read the whole file and fail on a cut tail)
        img.load()  # decode now: a truncated file raises here, not later in a worker
        return to_rgb(img)


# ---- preprocessing --------------------------------------------------------------------------------------
def crop_to_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Centre-crop the long side to at most `max_aspect` x the short side (`img` itself when within).

    Short-side resizes call this first: a 200000x2 image would otherwise grow to 3.2e6 x 32 at size 32. The
    final square crop lies far inside what is kept, so only the (already extreme) images it cuts move."""
    w, h = img.size
    if w > max_aspect * h:
        nw = int(max_aspect * h)
        return img.crop(((w - nw) // 2, 0, (w - nw) // 2 + nw, h))
    if h > max_aspect * w:
        nh = int(max_aspect * w)
        return img.crop((0, (h - nh) // 2, w, (h - nh) // 2 + nh))
    return img


def pad_to_square(img: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Centre `img` on a square canvas of its longer side filled with `color` (LLaVA's expand2square).
    The canvas is max(w, h)^2 pixels: `preprocess` shrinks extreme aspects before calling this."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(img: Image.Image, mode: str, size: int) -> np.ndarray:
    """RGB PIL image -> uint8 (size, size, 3) as the tokenizer sees it (see the module docstring)."""
    img = img if img.mode == "RGB" else to_rgb(img)
    if mode == "generation":
        img = crop_to_aspect(img)
        w, h = img.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.LANCZOS)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif mode == "understanding":
        side = max(img.size)
        if side * side > MAX_PIXELS and side > 4 * size:
            # the canvas of an extreme aspect dwarfs the image (20000x2000: 400 MP, 4,000,000x1: 1.6e13), so the
            # long side goes to 4 * size first; only pixels at the image's edge move (by a few levels: the paste
            # offset rounds in the smaller canvas). Canvases within MAX_PIXELS take the path below unchanged
            s = 4 * size / side
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
        img = pad_to_square(img).resize((size, size), Image.BILINEAR)
    else:
        raise ValueError(f"unknown mode {mode!r}: expected generation or understanding")
    return np.asarray(img, dtype=np.uint8)


def to_model_input(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
