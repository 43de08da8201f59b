"""Faithful small copies of real image files, built from photos that ship inside installed packages.

`image_variants()` returns {name: file bytes} for the modes and shapes that the public releases
contain and that break naive readers: grayscale, RGBA, LA, CMYK, palette with transparency, an
animated GIF, a 16-bit PNG, tiny (20x20), wide (1000x200) and tall (200x1000) images, a truncated
JPEG and a zero-byte file. The pixels come from real photos (skimage.data, matplotlib's
sample_data), not noise, so compression and colour conversion behave as on real data.
Names end with the file extension a crawler would give them.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

# The ones that decode to an image; `truncated.jpg` and `empty.jpg` do not.
DECODABLE = ("astronaut.jpg", "coffee.png", "camera_gray.jpg", "rgba.png", "la.png", "cmyk.jpg",
             "palette_transparent.png", "animated.gif", "gray16.png", "tiny.jpg", "wide.jpg", "tall.png",
             "chelsea.webp")
BROKEN = ("truncated.jpg", "empty.jpg")


@lru_cache(maxsize=None)
def photos() -> dict[str, np.ndarray]:
    """Real RGB / grayscale photos from installed packages: name -> uint8 array."""
    import skimage.data

    out = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
           "chelsea": skimage.data.chelsea(), "camera": skimage.data.camera(), "rocket": skimage.data.rocket()}
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            out["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except (OSError, ValueError):  # sample_data is optional in some matplotlib builds
        pass
    return out


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _small(name: str, size: int = 96) -> Image.Image:
    img = Image.fromarray(photos()[name])
    img.thumbnail((size, size))
    return img


def _crop(name: str, w: int, h: int) -> Image.Image:
    """A w x h window of a real photo (resized first so that the window fits)."""
    img = Image.fromarray(photos()[name]).convert("RGB")
    s = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BICUBIC)
    return img.crop((0, 0, w, h))


@lru_cache(maxsize=None)
def image_variants() -> dict[str, bytes]:
    """name -> file bytes (see the module docstring)."""
    astro = _small("astronaut")
    rgba = _small("coffee").convert("RGBA")
    alpha = np.zeros((rgba.height, rgba.width), np.uint8)
    alpha[:, rgba.width // 2:] = 255  # left half fully transparent: must come out white
    rgba.putalpha(Image.fromarray(alpha))
    la = _small("camera").convert("LA")
    la_alpha = np.zeros((la.height, la.width), np.uint8)
    la_alpha[:, la.width // 2:] = 255  # left half transparent as well
    la.putalpha(Image.fromarray(la_alpha))
    pal = _small("chelsea").convert("P", palette=Image.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0  # palette index 0 transparent
    frames = [_small("rocket", 64), _small("astronaut", 64).resize(_small("rocket", 64).size)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    gray16 = Image.fromarray((np.asarray(_small("camera")).astype(np.uint16) * 257))
    full_jpeg = _save(astro, "JPEG", quality=90)
    return {
        "astronaut.jpg": full_jpeg,
        "coffee.png": _save(_small("coffee"), "PNG"),
        "camera_gray.jpg": _save(_small("camera").convert("L"), "JPEG"),
        "rgba.png": _save(rgba, "PNG"),
        "la.png": _save(la, "PNG"),
        "cmyk.jpg": _save(_small("chelsea").convert("CMYK"), "JPEG"),
        "palette_transparent.png": _save(pal, "PNG", transparency=0),
        "animated.gif": gif.getvalue(),
        "gray16.png": _save(gray16, "PNG"),
        "tiny.jpg": _save(_crop("coffee", 20, 20), "JPEG"),
        "wide.jpg": _save(_crop("astronaut", 1000, 200), "JPEG"),
        "tall.png": _save(_crop("chelsea", 200, 1000), "PNG"),
        "chelsea.webp": _save(_small("chelsea"), "WEBP"),
        "truncated.jpg": full_jpeg[: len(full_jpeg) // 3],
        "empty.jpg": b"",
    }


def caption_for(name: str) -> str:
    """A plausible alt-text caption for a variant."""
    return f"a photo ({name.split('.')[0].replace('_', ' ')})"
