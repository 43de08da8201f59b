"""The synthetic shapes world that the demo, the ablation grid and the library tests train on.

    python -m experiments.synthetic --out data/demo [--seed 0] [--num-images 384] [--image-size 32]

One world: a shape (circle, square, triangle, 40-70 % of the side, anywhere inside the image) in
one of 6 foreground colours on one of 3 plain background colours, so 54 scenes. A caption names
all three in one of a few phrasings (`caption_for`); `classify_image` reads the three back from
pixels and judges generated images. Every writer is deterministic given its seed; tar headers
use mtime 0, so files are byte-identical.

Writers:
    write_shards(out, num_shards, per_shard, size, seed)    image-caption webdataset shards
        {00000..}.tar with <key>.png, <key>.txt (caption), <key>.json {path, shape, color, background, recaption}
    write_eval_folders(root, size, num_images, per_class)   held-out PNGs: root/eval/ (reconstruction)
        and the zero-shot ImageFolder root/zeroshot/<colour>_<shape>_on_a_<background>_background/ (54 classes)
    write_demo_data(out, DemoDataConfig)                    the demo dataset, the CLI above:
        images/{00000..}.tar   training shards (as write_shards)
        tokenizer_images/{00000..}.tar  with num_tokenizer_images > 0: more shards, for the tokenizer only
        eval/00000.tar         held-out images, same format (paths under shapes_eval/)
        eval/questions.json    held-out VQA items [{id, image, question, answer, kind, shape, color, background}]
        text/{00000..}.jsonl   plain text documents {"text": ...}
        instructions/train.json  LLaVA/Mini-Gemini conversations referencing images by relative path,
                               plus a few text-only conversations
        manifest.json          what was written (counts, shard patterns)
After `python -m unitok.extract --input 'data/demo/images/{...}.tar' --output data/demo/codes`, the
recipe data_recipes/demo.yaml reads codes, text and instructions from the demo layout.
"""
from __future__ import annotations

import io
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from runtime.run import write_json_atomic

SHAPES = ("circle", "square", "triangle")
FOREGROUNDS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
               "purple": (140, 60, 180), "orange": (245, 135, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SIDES = {"circle": "no corners", "square": "four sides", "triangle": "three sides"}


# ---- the world -----------------------------------------------------------------------------------
def random_scene(rng: random.Random) -> tuple[str, str, str]:
    """A uniformly drawn (shape, colour, background)."""
    return rng.choice(SHAPES), rng.choice(list(FOREGROUNDS)), rng.choice(list(BACKGROUNDS))


def draw_shape(shape: str, color: str, background: str, size: int, rng: random.Random) -> Image.Image:
    """One RGB image: a `color` `shape` (40-70 % of the side, jittered) on a `background` field."""
    if shape not in SHAPES or color not in FOREGROUNDS or background not in BACKGROUNDS:
        raise ValueError(f"unknown shape/colour: {shape}, {color}, {background}")
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.4, 0.7) * size
    cx = rng.uniform(s / 2, size - s / 2)
    cy = rng.uniform(s / 2, size - s / 2)
    box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    fill = FOREGROUNDS[color]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def caption_for(shape: str, color: str, background: str, rng: random.Random) -> str:
    """A short caption in one of a few phrasings."""
    article = "an" if color[0] in "aeiou" else "a"
    return rng.choice([
        f"{article} {color} {shape} on a {background} background",
        f"{article.capitalize()} {color} {shape} on {background}.",
        f"{color} {shape}, {background} background",
    ])


def recaption_for(shape: str, color: str, background: str) -> str:
    """A longer 'recaption' (the json caption field that recipes may select)."""
    return (f"The image shows a single {color} {shape} with {SIDES[shape]}, drawn on a plain {background} "
            f"background.")


def classify_image(img) -> dict[str, str]:
    """The checker: (shape, color, background) of an RGB image (PIL or (H, W, 3) uint8).

    background = the palette colour nearest the median border pixel; foreground = pixels far from
    it; color = the palette colour nearest their median; shape = the template (`shape_templates`:
    the ellipse, rectangle or upright triangle that the world draws in the foreground's bounding box)
    with the largest intersection over union with the foreground. Used to judge generated images and
    reconstructions. It reads every clean render right; on renders blurred with a Gaussian of sigma 1.5 px
    at 32 px it reads 99 % of shapes right, where a fill-ratio rule (square ~1, circle ~pi/4, triangle
    ~1/2 of the box) read 85 %: blur rounds corners and pushes squares and triangles toward the circle's
    fill ratio, but leaves them closest to their own template (tests/test_synthetic.py).
    """
    import numpy as np

    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img).astype(np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda k: float(((np.array(BACKGROUNDS[k]) - bg_rgb) ** 2).sum()))
    mask = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > 60
    if mask.sum() < 4:
        return {"shape": "none", "color": "none", "background": background}
    fg = np.median(a[mask], axis=0)
    color = min(FOREGROUNDS, key=lambda k: float(((np.array(FOREGROUNDS[k]) - fg) ** 2).sum()))
    templates = shape_templates(mask)
    shape = max(SHAPES, key=lambda k: float((mask & templates[k]).sum()) / float((mask | templates[k]).sum()))
    return {"shape": shape, "color": color, "background": background}


def shape_templates(mask) -> dict:
    """Boolean masks, the shape of `mask`, of the three shapes `draw_shape` draws, each filling the bounding
    box of `mask`'s True pixels (pixel centres): the inscribed ellipse, the box, the triangle with its
    apex at the top centre and its base along the bottom."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    return {"circle": ((xx - cx) / hw) ** 2 + ((yy - cy) / hh) ** 2 <= 1, "square": box,
            "triangle": box & (np.abs(xx - cx) <= hw * (yy - y0) / (y1 - y0))}


# ---- image shards --------------------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _items(n: int, prefix: str, rng: random.Random) -> list[dict]:
    items = []
    for i in range(n):
        shape, color, bg = random_scene(rng)
        items.append({"key": f"{prefix}{i:06d}", "path": f"{prefix}/{i:06d}.png", "shape": shape, "color": color,
                      "background": bg, "caption": caption_for(shape, color, bg, rng),
                      "recaption": recaption_for(shape, color, bg)})
    return items


def numbered_pattern(n: int, ext: str = "tar") -> str:
    """The brace pattern of files `00000.ext` .. `{n-1:05d}.ext`, as webdataset and the recipes expand it."""
    return f"{{00000..{n - 1:05d}}}.{ext}"


def _write_image_shards(out: Path, items: list[dict], per_shard: int, size: int, rng: random.Random) -> list[Path]:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(items), per_shard):
        path = out / f"{s // per_shard:05d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp), mtime=0) as w:
            for it in items[s:s + per_shard]:
                img = draw_shape(it["shape"], it["color"], it["background"], size, rng)
                w.write({"__key__": it["key"], "png": _png(img), "txt": it["caption"],
                         "json": {k: it[k] for k in ("path", "shape", "color", "background", "recaption")}})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_shards(out_dir: str | os.PathLike, num_shards: int, samples_per_shard: int, size: int = 32,
                 seed: int = 0) -> list[str]:
    """`num_shards` webdataset tars `{00000..}.tar` of `samples_per_shard` captioned shapes each -> their paths
    (the demo's layout and members; the same arguments give byte-identical shards)."""
    if num_shards <= 0 or samples_per_shard <= 0 or size <= 0:
        raise ValueError("num_shards, samples_per_shard and size must be positive")
    rng = random.Random(seed)
    items = _items(num_shards * samples_per_shard, "shapes", rng)
    return [str(p) for p in _write_image_shards(Path(out_dir), items, samples_per_shard, size, rng)]


def scene_class(shape: str, color: str, background: str) -> str:
    """The zero-shot class folder of a scene; open_clip prompts read it as 'red circle on a white background'."""
    return f"{color}_{shape}_on_a_{background}_background"


def write_eval_folders(root: str | os.PathLike, size: int, num_images: int, per_class: int,
                       seed: int = 1234) -> tuple[Path, Path]:
    """Held-out PNGs at `size` px: `root/eval/` (`num_images` random scenes, for reconstruction) and the
    zero-shot ImageFolder `root/zeroshot/<scene_class>/` (`per_class` images of each of the 54 scenes)."""
    root = Path(root)
    ev, zs = root / "eval", root / "zeroshot"
    ev.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"eval/{seed}")
    for i in range(num_images):
        draw_shape(*random_scene(rng), size, rng).save(ev / f"{i:05d}.png")
    rng = random.Random(f"zeroshot/{seed}")
    for color in FOREGROUNDS:
        for shape in SHAPES:
            for bg in BACKGROUNDS:
                d = zs / scene_class(shape, color, bg)
                d.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    draw_shape(shape, color, bg, size, rng).save(d / f"{i:03d}.png")
    return ev, zs


# ---- the demo dataset ----------------------------------------------------------------------------
@dataclass
class DemoDataConfig:
    """Sizes of the demo dataset."""

    num_images: int = 384
    """Training images (captions, text-to-image and instruction images)."""
    images_per_shard: int = 64
    """Images per tar shard."""
    num_eval_images: int = 48
    """Held-out images for VQA / generation checks."""
    num_tokenizer_images: int = 0
    """Images for tokenizer training only, under tokenizer_images/ (0: none, the tokenizer trains on images/).
    They come from their own random stream, so every other file does not depend on this number."""
    image_size: int = 32
    """Square image side in pixels (32 = the debug tokenizer's resolution)."""
    num_text: int = 256
    """Plain text documents."""
    text_per_file: int = 128
    """Documents per JSONL file."""
    seed: int = 0
    """Everything is a function of this seed."""

    def __post_init__(self):
        for k in ("num_images", "images_per_shard", "num_eval_images", "num_text", "text_per_file"):
            if getattr(self, k) <= 0:
                raise ValueError(f"{k} must be positive")
        if self.num_tokenizer_images < 0:
            raise ValueError(f"num_tokenizer_images must be >= 0, got {self.num_tokenizer_images}")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")


QUESTIONS = {
    "shape": ("What shape is in the image?", lambda it: f"A {it['shape']}."),
    "color": ("What color is the shape?", lambda it: f"{it['color'].capitalize()}."),
    "background": ("What is the background color?", lambda it: f"{it['background'].capitalize()}."),
    "describe": ("Describe the image briefly.", lambda it: f"A {it['color']} {it['shape']} on a {it['background']} "
                                                            "background."),
}
TEXT_ONLY = [
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("Does a circle have corners?", "No, a circle has no corners."),
    ("What color do you get by mixing red and blue?", "Purple."),
    ("What color do you get by mixing blue and yellow?", "Green."),
    ("What color do you get by mixing red and yellow?", "Orange."),
]


def _conversations(items: list[dict], rng: random.Random) -> list[dict]:
    rows = []
    for it in items:
        kinds = rng.sample(list(QUESTIONS), k=rng.choice([1, 2]))
        conv = []
        for j, k in enumerate(kinds):
            q, a = QUESTIONS[k]
            conv.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
            conv.append({"from": "gpt", "value": a(it)})
        rows.append({"id": it["key"], "image": it["path"], "conversations": conv})
    for i in range(max(4, len(items) // 16)):
        q, a = TEXT_ONLY[i % len(TEXT_ONLY)]
        rows.append({"id": f"text{i:05d}", "conversations": [{"from": "human", "value": q},
                                                            {"from": "gpt", "value": a}]})
    rng.shuffle(rows)
    return rows


def _text_docs(n: int, rng: random.Random) -> list[str]:
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            shape, color = rng.choice(SHAPES), rng.choice(list(FOREGROUNDS))
            sentences.append(rng.choice([
                f"A {shape} has {SIDES[shape]}.",
                f"The {color} {shape} sits on the table.",
                f"Mixing paint is fun: {color} is a bright color.",
                f"Children learn that a {shape} is a simple shape.",
                "The quick brown fox jumps over the lazy dog.",
            ]))
        docs.append(" ".join(sentences))
    return docs


def write_demo_data(out_dir: str | os.PathLike, cfg: DemoDataConfig | None = None) -> dict:
    """Write the demo dataset under `out_dir`; returns the manifest (also saved as manifest.json)."""
    cfg = cfg or DemoDataConfig()
    out = Path(out_dir)
    rng = random.Random(cfg.seed)
    train = _items(cfg.num_images, "shapes", rng)
    held = _items(cfg.num_eval_images, "shapes_eval", rng)
    shards = _write_image_shards(out / "images", train, cfg.images_per_shard, cfg.image_size, rng)
    _write_image_shards(out / "eval", held, cfg.num_eval_images, cfg.image_size, rng)
    questions = []
    for it in held:
        k = rng.choice(["shape", "color", "background"])
        q, a = QUESTIONS[k]
        questions.append({"id": it["key"], "image": it["path"], "question": q, "answer": a(it).rstrip("."),
                          "kind": k, "shape": it["shape"], "color": it["color"], "background": it["background"]})
    (out / "eval" / "questions.json").write_text(json.dumps(questions, indent=1))
    (out / "text").mkdir(parents=True, exist_ok=True)
    docs = _text_docs(cfg.num_text, rng)
    n_text = 0
    for f, s in enumerate(range(0, len(docs), cfg.text_per_file)):
        (out / "text" / f"{f:05d}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs[s:s + cfg.text_per_file]))
        n_text += 1
    (out / "instructions").mkdir(parents=True, exist_ok=True)
    conv = _conversations(train, rng)
    (out / "instructions" / "train.json").write_text(json.dumps(conv, indent=1))
    image_shards = tok_shards = f"images/{numbered_pattern(len(shards))}"
    if cfg.num_tokenizer_images:
        trng = random.Random(f"{cfg.seed}-tokenizer")
        n = len(_write_image_shards(out / "tokenizer_images", _items(cfg.num_tokenizer_images, "tokenizer", trng),
                                    cfg.images_per_shard, cfg.image_size, trng))
        tok_shards = f"tokenizer_images/{numbered_pattern(n)}"
    manifest = {"config": asdict(cfg), "image_shards": image_shards, "tokenizer_shards": tok_shards,
                "text_files": f"text/{numbered_pattern(n_text, 'jsonl')}", "num_images": len(train),
                "num_eval_images": len(held), "num_text": len(docs), "num_conversations": len(conv)}
    write_json_atomic(out / "manifest.json", manifest)  # last, and whole: the demo skips a data folder that has it
    return manifest


@dataclass
class DemoDataArgs(DemoDataConfig):
    """Write the demo dataset (`python -m experiments.synthetic`)."""

    out: str = "data/demo"
    """Output folder."""


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: write the demo dataset and print its manifest."""
    import dataclasses

    import tyro

    args = tyro.cli(DemoDataArgs, args=argv, description=__doc__)
    cfg = DemoDataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoDataConfig)})
    print(json.dumps(write_demo_data(args.out, cfg), indent=1))


if __name__ == "__main__":
    main()
