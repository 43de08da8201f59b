"""The unified MLLM behind every front end: loading, image I/O, answering, text-to-image, and the
per-conversation session that the terminal chat (`mllm.chat`) and the browser chat (`mllm.web`) share.

    engine = MLLMEngine.load(EngineConfig(model=EXPORT_DIR, tokenizer=TOKENIZER))
    session = ChatSession(engine, SessionConfig(answer_temperature=0.7, seed=0))
    session.attach(["photo.png"])                      # codes (K, h, w) queued for the next question
    turn = session.prepare("What is in the image?")    # InputError on bad input; turn.notices
    reply = session.answer(turn, on_text=print)        # streams, then joins the history; reply.notices
    images, paths = session.generate("a red apple")    # uint8 (N, S, S, 3) and the PNGs written

What runs (REFERENCE.md 6.6-6.10):
  - understanding: each image is read as `unitok.extract` reads it (unitok.image_io: first frame,
    transparency on white), padded to a square with (122, 116, 104), resized to the image size,
    mapped to [-1, 1] and encoded by the UniTok tokenizer into codes (K, h, w); the conversation is
    rendered with the vicuna_v1 template ("<image>\\n" + question per user turn) and answered with
    the KV-cached `mllm.generate.answer` (greedy by default, answer_temperature to sample), streaming
    the text as it is decoded. The history is trimmed oldest-first so that prompt + reply fit in the
    model's context (config.max_position_embeddings), with a notice; so is a reply budget cut by the
    window, and a reply that ran into its token limit.
  - generation: prompt + " Generate an image based on this description." + boi (the model config's
    boi_token_id: the release's 3, or the marker recorded for another base's tokenizer), classifier-free
    guidance against the "<unconditional>" prompt (cfg_scale), sampling with temperature/top-k/top-p
    (defaults = the release's GenAI/MJHQ scripts: cfg 7, T 1, no top-k/top-p), codes decoded by the
    tokenizer (its full-attention projection); with candidates > 1, the UniTok's own text-image score
    keeps the best of that many samples per image.
A session seeds its sampling generator once, when it starts: sampled answers and images continue one
random stream (two sampled answers to the same question differ; a new session replays the stream).
This module holds no terminal or gradio code; `mllm.evaluate` and `experiments.demo` use `MLLMEngine` alone.

Shapes: codes (K, h, w) per image, K = num_codebooks, h = w = image_size / 16; generated images
(N, S, S, 3) uint8 with S = image_size.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

from mllm.data.collate import Sample
from mllm.data.templates import IMAGE_PLACEHOLDER, chat_prompt, drop_special_text, null_prompt_ids, t2i_prompt_ids
from mllm.generate import SamplingConfig, answer, generate_images
# one image path for extraction and chat: a file gives the same codes in both
from unitok.image_io import MAX_PIXELS, ImageTooLarge, load_image, preprocess, to_model_input

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""Weight files one of which an export folder holds (transformers' names)."""


class InputError(ValueError):
    """A user mistake (bad path, bad prompt, ...): reported in one line, the session goes on."""


class GenerationStopped(Exception):
    """Raised inside a generation loop when the user asked to stop (Ctrl-C)."""


# ---- configs ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class EngineOptions:
    """How the model is loaded, where, and how images enter it (everything but which files)."""

    official_mllm: bool = False
    """`model` is the released FoundationVision/unitok_mllm folder (loaded by load_official_mllm)."""
    text_tokenizer: str | None = None
    """Folder with the text (Llama) tokenizer files; None = the model folder."""
    attn_mode: Literal["full", "causal"] = "full"
    """Attention mode of an official tokenizer .pth (their keys do not record it); ignored for folders."""
    device: str | None = None
    """cpu, cuda or cuda:N; None = cuda when available."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """MLLM weights dtype (the tokenizer always runs in fp32, as its quantizer path requires)."""
    image_size: int | None = None
    """Square side images are resized to (multiple of 16); None = the size the MLLM was trained at
    (config.json image_size), else the tokenizer's training size. Another size than the recorded one
    is refused."""
    max_image_pixels: int = MAX_PIXELS
    """Refuse input images with more pixels than this (width x height)."""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attn_mode not in ("full", "causal"):
            raise ValueError(f"attn_mode must be full or causal, got {self.attn_mode!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % 16):
            raise ValueError(f"image_size must be a positive multiple of 16, got {self.image_size}")
        if self.max_image_pixels <= 0:
            raise ValueError("max_image_pixels must be positive")


@dataclass(kw_only=True)
class EngineConfig(EngineOptions):
    """What to load (the MLLM and the UniTok tokenizer), where, and how images enter the model."""

    model: str
    """This project's export folder (config.json + safetensors + text tokenizer files), or the released
    unitok_mllm folder with --official-mllm."""
    tokenizer: str
    """UniTok checkpoint folder, or the official unitok_tokenizer.pth."""


@dataclass
class ImageGenConfig:
    """Text-to-image settings (defaults: the release's GenAI-Bench / MJHQ scripts, REFERENCE 6.9)."""

    cfg_scale: float = 7.0
    """Classifier-free guidance scale (1 = no guidance; the null prompt is then skipped)."""
    temperature: float = 1.0
    """Sampling temperature for every sub-code (0 = greedy)."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus filter (1 = off)."""
    num_images: int = 1
    """Images per prompt."""
    candidates: int = 1
    """Samples drawn for each image; the one the UniTok ranks first is kept: its own text-image score (the
    decoded image, encoded again, against the prompt's text features), as DALL-E ranks samples with CLIP.
    1 = no ranking (the release's scripts)."""

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {self.candidates}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        self.sampling()  # validates temperature / top_k / top_p

    def sampling(self) -> SamplingConfig:
        """The per-sub-code sampling rule."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class SessionConfig:
    """How one conversation answers and draws (the terminal and the web front ends alike)."""

    gen: ImageGenConfig = field(default_factory=ImageGenConfig)
    """Text-to-image settings."""
    answer_temperature: float = 0.0
    """Answer sampling temperature (0 = greedy, as the VQA evaluation)."""
    max_new_tokens: int = 256
    """Longest answer in tokens (also bounded by the context window)."""
    seed: int = 0
    """Seeds the session's sampling generator (answers and images) once, when the session starts."""
    out_dir: str = "chat_outputs"
    """Where generated PNGs go."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.answer_temperature < 0:
            raise ValueError("answer_temperature must be >= 0")


# ---- engine -------------------------------------------------------------------------------------
class StreamDecoder:
    """Token ids -> text deltas for streaming. Re-decodes the whole reply each step (replies are
    short) so sentencepiece spacing is right, and holds back text ending in an incomplete UTF-8
    byte sequence (decoded as U+FFFD) until the next piece completes it."""

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids: list[int] = []
        self.text = ""
        self.finished = False

    def push(self, token_id: int) -> str:
        """Add one generated id; returns the newly printable text ("" if none)."""
        if self.finished:
            return ""
        if token_id in self.stop_ids:
            self.finished = True
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return ""
        if text.startswith(self.text):
            delta = text[len(self.text):]
        else:  # the tokenizer re-spaced earlier text; printed text cannot be taken back, print the new tail
            common = next((i for i, (a, b) in enumerate(zip(self.text, text)) if a != b),
                          min(len(text), len(self.text)))
            delta = text[common:] if len(text) > len(self.text) else ""
        self.text = text
        return delta


class MLLMEngine:
    """Model + text tokenizer + UniTok: the operations shared by chat, web and evaluation."""

    def __init__(self, model, text_tokenizer, image_tokenizer, image_size: int | None = None,
                 max_image_pixels: int = MAX_PIXELS):
        cfg = model.config
        if image_tokenizer.num_codebooks != cfg.num_codebooks or image_tokenizer.codebook_size != cfg.codebook_size:
            raise ValueError(
                f"tokenizer codes ({image_tokenizer.num_codebooks} x {image_tokenizer.codebook_size}) do not match "
                f"the MLLM ({cfg.num_codebooks} x {cfg.codebook_size}): wrong --tokenizer for this model?")
        if text_tokenizer.bos_token_id is None or text_tokenizer.eos_token_id is None:
            raise ValueError("the text tokenizer needs bos and eos tokens")
        self.model, self.text_tokenizer, self.image_tokenizer = model.eval(), text_tokenizer, image_tokenizer.eval()
        trained = getattr(cfg, "image_size", None)  # recorded by mllm.train from the code shards
        if image_size is not None and trained is not None and int(image_size) != int(trained):
            raise ValueError(f"--image-size {image_size} does not match the {trained} px images this MLLM was "
                             f"trained on (its config.json image_size); its code grid would differ")
        self.image_size = int(image_size or trained or image_tokenizer.cfg.img_size)
        if self.image_size % 16:
            raise ValueError(f"image size must be a multiple of 16, got {self.image_size}")
        self.max_image_pixels = max_image_pixels

    @classmethod
    def load(cls, cfg: EngineConfig) -> "MLLMEngine":
        """Load the MLLM (export or official folder), the text tokenizer and the UniTok."""
        from transformers import AutoModelForCausalLM

        import mllm  # noqa: F401  (registers the model type with transformers)
        from mllm.modeling import default_attn_implementation
        from mllm.modeling.base import load_text_tokenizer
        from unitok.loading import load_tokenizer

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available")
        model_dir = Path(cfg.model)
        if not (model_dir / "config.json").is_file():
            run = (model_dir / "latest").is_file()
            hint = f" (a training run folder: its export is {model_dir / 'export'})" if run else ""
            raise FileNotFoundError(f"no config.json in {model_dir}: expected an MLLM export folder{hint}")
        config = json.loads((model_dir / "config.json").read_text())
        if not cfg.official_mllm:
            if config.get("model_type") != "unitok_mllm":
                raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model, not an MLLM export "
                                 "(model_type unitok_mllm): pass the export of mllm.train (RUN/export), or "
                                 "--official-mllm for the released unitok_mllm folder")
            if not any((model_dir / f).is_file() for f in WEIGHT_FILES):
                raise FileNotFoundError(f"no weights in {model_dir} (none of {', '.join(WEIGHT_FILES)}): an "
                                        "incomplete copy or export?")
        # the small files first: fail before loading weights
        flag = "--text-tokenizer" if cfg.text_tokenizer else "--model (no --text-tokenizer)"
        try:
            text_tokenizer = load_text_tokenizer(cfg.text_tokenizer or cfg.model, flag)
        except (OSError, ValueError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileNotFoundError(f"cannot load the text tokenizer ({reason}); pass --text-tokenizer DIR (a Llama "
                                    "tokenizer folder)") from e
        image_tokenizer = load_tokenizer(cfg.tokenizer, device=device, attn_mode=cfg.attn_mode)
        trained_with = config.get("tokenizer_fingerprint")
        if trained_with is not None and trained_with != (given := image_tokenizer.fingerprint()):
            raise ValueError(f"{model_dir} was trained on the codes of tokenizer {trained_with}, but --tokenizer "
                             f"{cfg.tokenizer} (--attn-mode {cfg.attn_mode}) is tokenizer {given}: its images would "
                             "be read and drawn with other codes; pass the tokenizer the MLLM was trained with")
        dtype = DTYPES[cfg.dtype]
        if cfg.official_mllm:
            from mllm.modeling.official import load_official_mllm

            model = load_official_mllm(model_dir, dtype=dtype, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                         attn_implementation=default_attn_implementation(dtype, device))
        model = model.to(device).eval()
        return cls(model, text_tokenizer, image_tokenizer, cfg.image_size, cfg.max_image_pixels)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the MLLM runs."""
        return self.model.device

    @property
    def context_length(self) -> int:
        """Positions the model was built for (prompt + images + reply must fit)."""
        return int(self.model.config.max_position_embeddings)

    @property
    def grid(self) -> tuple[int, int]:
        """Code grid (h, w) of one image at `image_size`."""
        return self.image_size // 16, self.image_size // 16

    @property
    def eos_id(self) -> int:
        """Answers stop at this id."""
        return int(self.text_tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """Left-padding id of batched prompts."""
        pad = self.text_tokenizer.pad_token_id
        return int(pad if pad is not None else 0)  # release convention: pad = unk = 0

    # ---- images in ------------------------------------------------------------------------------
    def open_image(self, path: str | Path) -> Image.Image:
        """Open and fully read an image file as RGB (`unitok.image_io.load_image`: first frame, alpha on
        white, as extraction reads it); InputError with a one-line reason otherwise."""
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"no such file: {p}")
        if not p.is_file():
            raise InputError(f"not a file: {p}")
        try:
            return load_image(p, max_pixels=self.max_image_pixels)
        except ImageTooLarge as e:
            raise InputError(f"image too large: {p} is {e.width}x{e.height} = {e.width * e.height:,} pixels, over "
                             f"the limit of {e.limit:,} (--max-image-pixels)") from e
        except Image.DecompressionBombError as e:
            raise InputError(f"image too large: {p} ({e})") from e
        except Image.UnidentifiedImageError as e:
            raise InputError(f"not an image file: {p}") from e
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read image {p}: {e}") from e

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> (3, S, S) in [-1, 1]: `unitok.image_io.preprocess` in understanding mode (pad to
        square with (122, 116, 104), bilinear resize), exactly as `unitok.extract --mode understanding`."""
        return to_model_input([preprocess(img, "understanding", self.image_size)])[0]

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Images -> codes (K, h, w) each, on the CPU (as `Sample` expects)."""
        if not images:
            return []
        x = torch.stack([self.preprocess(im) for im in images]).to(self.image_tokenizer.device)
        return list(self.image_tokenizer.encode(x).cpu())  # (B, K, h, w) -> B x (K, h, w)

    # ---- text out -------------------------------------------------------------------------------
    def chat_sample(self, turns: list[str], images: list[torch.Tensor]) -> Sample:
        """vicuna_v1 generation prompt; `turns` alternate user/assistant and end with the user's."""
        return chat_prompt(self.text_tokenizer, turns, images=images, template="vicuna_v1")

    def answer_ids(self, prompts: list[Sample], max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
                   generator: torch.Generator | None = None, on_text: Callable[[str], None] | None = None,
                   stop: threading.Event | None = None, stopped_by: list | None = None) -> list[list[int]]:
        """Answer a batch of prompts; the new token ids per prompt, without the stop id. An answer ends at eos,
        at the image-start marker (the model began drawing: answers are text) or where the context is full.
        `on_text(delta)` streams the (single) prompt's text; a set `stop` ends the generation after the current
        step (the ids so far are returned); `stopped_by`, if given, receives each prompt's stop id (or None)."""
        if on_text is not None and len(prompts) != 1:
            raise ValueError("streaming (on_text) takes exactly one prompt")
        stop_ids = {self.eos_id, self.model.config.boi_token_id}
        stream = StreamDecoder(self.text_tokenizer, stop_ids) if on_text is not None else None
        partial: list[int] = []
        ended: list = [None] * len(prompts)

        def on_token(ids: torch.Tensor) -> bool:
            for b, tok in enumerate(ids.tolist()):
                if tok in stop_ids and ended[b] is None:  # (a finished row gets pad ids)
                    ended[b] = tok
            if stream is not None:
                tok = int(ids[0])
                if not stream.finished and tok not in stop_ids:
                    partial.append(tok)
                delta = stream.push(tok)
                if delta:
                    on_text(delta)
            return stop is not None and stop.is_set()

        try:
            return answer(self.model, prompts, max_new_tokens=max_new_tokens,
                          sampling=sampling or SamplingConfig(temperature=0), stop_ids=stop_ids, pad_id=self.pad_id,
                          generator=generator, on_token=on_token, context_length=self.context_length)
        except KeyboardInterrupt:
            if stream is None:
                raise
            return [partial]  # a second Ctrl-C landed mid-step: keep what was streamed
        finally:
            if stopped_by is not None:
                stopped_by[:] = ended

    def answer(self, prompts: list[Sample], max_new_tokens: int = 128, sampling: SamplingConfig | None = None,
               generator: torch.Generator | None = None, on_text: Callable[[str], None] | None = None,
               stop: threading.Event | None = None) -> list[str]:
        """`answer_ids`, decoded to text."""
        return [self.decode(o) for o in self.answer_ids(prompts, max_new_tokens, sampling, generator, on_text, stop)]

    def decode(self, ids: list[int]) -> str:
        """Answer ids -> text (special tokens and image markers skipped, outer whitespace stripped; an
        incomplete character at the end, as a reply cut mid-character leaves, dropped as the stream does)."""
        markers = {self.model.config.boi_token_id, self.model.config.eoi_token_id}
        text = self.text_tokenizer.decode([i for i in ids if i not in markers], skip_special_tokens=True)
        return text.rstrip("\ufffd").strip()

    # ---- images out -----------------------------------------------------------------------------
    def t2i_prompt(self, prompt: str) -> list[int]:
        """Validated generation prompt ids; InputError when empty or beyond the context."""
        if not prompt or not prompt.strip():
            raise InputError("empty prompt: describe the image to generate, e.g. /gen a red apple on a table")
        ids = t2i_prompt_ids(self.text_tokenizer, prompt, self.model.config.boi_token_id)
        need = len(ids) + self.grid[0] * self.grid[1]
        if need > self.context_length:
            raise InputError(f"prompt too long: {len(ids)} prompt tokens + {self.grid[0] * self.grid[1]} image "
                             f"positions = {need}, beyond the model's context of {self.context_length}")
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[str], gen: ImageGenConfig, generator: torch.Generator | None = None,
                 on_position: Callable[[int, int], None] | None = None,
                 stop: threading.Event | None = None) -> np.ndarray:
        """Prompts -> uint8 images (len(prompts) * num_images, S, S, 3), grouped by prompt.

        `on_position(t, L)` is called after each of the L positions; a set `stop` raises GenerationStopped.
        """
        ids = [self.t2i_prompt(p) for p in prompts]
        per_prompt = gen.num_images * gen.candidates
        ids = [i for i in ids for _ in range(per_prompt)]
        L = self.grid[0] * self.grid[1]

        def _pos(t: int) -> None:
            if stop is not None and stop.is_set():
                raise GenerationStopped()
            if on_position is not None:
                on_position(t + 1, L)

        use_cfg = gen.cfg_scale != 1.0
        null = null_prompt_ids(self.text_tokenizer, self.model.config.boi_token_id) if use_cfg else None
        codes = generate_images(self.model, ids, self.grid, null_ids=null,
                                cfg_scale=gen.cfg_scale, sampling=gen.sampling(), generator=generator,
                                pad_id=self.pad_id, on_position=_pos)  # (N, K, h, w)
        pix = self.image_tokenizer.decode(codes.to(self.image_tokenizer.device))  # (N, 3, S, S) in [-1, 1]
        if gen.candidates > 1:
            pix = self.best_candidates(pix, [p for p in prompts for _ in range(gen.num_images)], gen.candidates)
        return ((pix.float() + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def text_image_scores(self, pix: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The UniTok's cosine similarity of images (N, 3, S, S) in [-1, 1] to N texts: (N,) float32."""
        from unitok.data import get_tokenizer

        tk = self.image_tokenizer
        tokens = get_tokenizer(context_length=tk.cfg.text.context_length)(texts).to(tk.device)
        return (tk.encode_image(pix.to(tk.device)).float() * tk.encode_text(tokens).float()).sum(-1).cpu()

    def best_candidates(self, pix: torch.Tensor, texts: list[str], n: int) -> torch.Tensor:
        """Images (len(texts) * n, 3, S, S), n consecutive candidates per text -> (len(texts), 3, S, S): per
        text the candidate with the highest `text_image_scores` (the first one on a tie)."""
        scores = self.text_image_scores(pix, [t for t in texts for _ in range(n)]).view(len(texts), n)
        best = scores.argmax(1) + torch.arange(len(texts)) * n
        return pix[best.to(pix.device)]

    @staticmethod
    def save_pngs(images: np.ndarray, out_dir: str | Path, prompt: str) -> list[Path]:
        """Write images (N, H, W, 3) uint8 as PNGs named after the time and prompt; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for i, arr in enumerate(images):
            p = out / f"{stamp}-{slug}-{i}.png"
            n = 1
            while True:  # the name is taken by creating the file: two processes in one second both found it free
                try:
                    with open(p, "xb") as f:
                        Image.fromarray(arr).save(f, format="PNG")
                    break
                except FileExistsError:
                    p = out / f"{stamp}-{slug}-{i}-{n}.png"
                    n += 1
            paths.append(p.resolve())
        return paths


# ---- conversation state -------------------------------------------------------------------------
@dataclass
class Exchange:
    """One finished question/answer pair."""

    question: str
    """The user turn as rendered (one "<image>\\n" per attached image, then the text)."""
    images: list[torch.Tensor]
    """Codes (K, h, w) of the images attached to this question."""
    answer: str
    """The model's reply (possibly cut short by a stop)."""


@dataclass
class PreparedTurn:
    """A question ready to answer: the prompt plus what to keep if it is committed."""

    sample: Sample
    """The whole conversation rendered as one generation prompt."""
    max_new_tokens: int
    """Reply budget: the session's max_new_tokens, or less where the context window is short."""
    dropped: int
    """Oldest exchanges left out to fit the context."""
    question: str
    """The user turn as rendered."""
    images: list[torch.Tensor]
    """Codes (K, h, w) of the images that go with this question."""
    history: list[Exchange]
    """The (trimmed) history the prompt was built from."""
    notices: list[str] = field(default_factory=list)
    """What the user should know before the reply (dropped exchanges, a reply budget cut by the window)."""
    conversation: int = 0
    """The session's conversation it belongs to (`ChatSession.reset` starts the next one)."""


@dataclass
class Reply:
    """An answered turn."""

    text: str
    """The reply (what was generated before a stop, if stopped)."""
    num_tokens: int
    """Tokens generated, without the stop id."""
    stopped: bool
    """The user stopped the generation."""
    notices: list[str] = field(default_factory=list)
    """What the user should know after the reply (stopped, or cut at the token limit)."""


class ChatSession:
    """One conversation, whatever the front end: the history, images attached to the next question,
    the trimming that keeps prompt + reply inside the context window, and the sampling generator,
    seeded once when the session starts. `stop` (a threading.Event) ends a running answer after its
    step, or a running image generation with GenerationStopped."""

    def __init__(self, engine: MLLMEngine, cfg: SessionConfig | None = None):
        self.engine = engine
        self.cfg = cfg or SessionConfig()
        self.history: list[Exchange] = []
        self.pending: list[torch.Tensor] = []
        self.generator = torch.Generator(device=engine.device).manual_seed(self.cfg.seed)
        self.stop = threading.Event()
        self.conversation = 0
        """Counts resets: a turn prepared before one is not committed to the new conversation."""
        self._answering = False

    def reset(self) -> None:
        """Forget the history and any pending images, and stop a reply in progress (the browser chat answers on
        another thread); that reply is not committed. An image generation goes on (it belongs to no
        conversation). The generator runs on: a new conversation does not replay the previous one's samples."""
        self.history, self.pending = [], []
        self.conversation += 1
        if self._answering:
            self.stop.set()

    # ---- images in ------------------------------------------------------------------------------
    def attach(self, paths: list[str | Path]) -> int:
        """Open, preprocess and encode image files for the next question (all or none); returns how many."""
        if not paths:
            raise InputError("usage: /image PATH [PATH ...]")
        images = [self.engine.open_image(p) for p in paths]
        self.attach_codes(self.engine.encode_images(images))
        return len(images)

    def attach_codes(self, codes: list[torch.Tensor]) -> None:
        """Queue encoded images (K, h, w) for the next question."""
        self.pending.extend(codes)

    # ---- answers --------------------------------------------------------------------------------
    def prepare(self, question: str, max_new_tokens: int | None = None) -> PreparedTurn:
        """Build the prompt for `question` (+ pending images), dropping the oldest exchanges until
        prompt + max_new_tokens (default: the session's) fits the context; the reply budget shrinks when
        even the bare question leaves less room. InputError on an empty question or one that cannot fit
        at all. Nothing changes until `answer` commits the turn."""
        want = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        question = question.strip()
        if not question:
            raise InputError("empty question: type a question, or /help for commands")
        if IMAGE_PLACEHOLDER in question:
            raise InputError(f"the text {IMAGE_PLACEHOLDER} is reserved; attach images with /image PATH")
        turn = IMAGE_PLACEHOLDER + "\n"
        user = turn * len(self.pending) + question
        ctx = self.engine.context_length
        history = list(self.history)
        dropped = 0
        while True:
            turns = [t for ex in history for t in (ex.question, ex.answer)] + [user]
            images = [c for ex in history for c in ex.images] + list(self.pending)
            try:
                sample = self.engine.chat_sample(turns, images)
            except ValueError as e:  # the template's own checks (placeholders against images, roles)
                raise InputError(f"cannot build the prompt: {e}") from e
            n = sample.expanded_length()
            if n + want <= ctx or not history:
                break
            history.pop(0)
            dropped += 1
        if n >= ctx:
            raise InputError(f"question too long: {n} tokens with its images, beyond the model's context of "
                             f"{ctx} tokens")
        budget = min(want, ctx - n)
        notices = []
        if dropped:
            notices.append(f"[context: dropped the {dropped} oldest exchange(s) to fit the {ctx}-token window]")
        if budget < want:
            notices.append(f"[context: the reply is limited to {budget} tokens by the {ctx}-token window]")
        return PreparedTurn(sample, budget, dropped, user, list(self.pending), history, notices, self.conversation)

    def answer(self, turn: PreparedTurn, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer a prepared turn with the session's generator (streaming deltas to `on_text`), then
        commit it to the history; a set `stop` ends the reply early (what was generated is kept)."""
        self._answering = True
        self.stop.clear()
        try:
            if turn.conversation != self.conversation:  # reset after it was prepared: nothing to answer
                return Reply("", 0, True, ["[conversation reset]"])
            sampling = SamplingConfig(temperature=self.cfg.answer_temperature)
            ended: list = []
            ids = self.engine.answer_ids([turn.sample], turn.max_new_tokens, sampling, self.generator,
                                         on_text=on_text, stop=self.stop, stopped_by=ended)[0]
        finally:
            self._answering = False
        reply = Reply(self.engine.decode(ids), len(ids), self.stop.is_set())
        if reply.stopped:
            reply.notices.append("[stopped]")
        elif ended and ended[0] == self.engine.model.config.boi_token_id:
            reply.notices.append("[the model began an image: answers are text; /gen PROMPT draws images]")
        elif reply.num_tokens >= turn.max_new_tokens:
            reply.notices.append(f"[the reply was cut at its limit of {turn.max_new_tokens} tokens]")
        self.commit(turn, reply.text)
        return reply

    def commit(self, turn: PreparedTurn, reply: str) -> None:
        """Record the answered turn (the trimmed history replaces the old one; pending images are used), unless
        the conversation was reset while it was answered."""
        if turn.conversation != self.conversation:
            return
        # the placeholder marks the user's images: in a stored reply it would claim one more image next turn; a
        # control token's text would end the turn inside the reply
        reply = drop_special_text(self.engine.text_tokenizer, reply.replace(IMAGE_PLACEHOLDER, ""))
        self.history = turn.history + [Exchange(turn.question, turn.images, reply)]
        self.pending = []

    # ---- images out -----------------------------------------------------------------------------
    def generate(self, prompt: str, gen: ImageGenConfig | None = None, generator: torch.Generator | None = None,
                 on_position: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[Path]]:
        """Generate images for `prompt` (default settings: the session's; default generator: the
        session's) and write them as PNGs under out_dir. Returns (uint8 (N, S, S, 3), PNG paths);
        GenerationStopped when `stop` is set, before anything is written."""
        self.engine.t2i_prompt(prompt)  # validate before any work
        out = Path(self.cfg.out_dir)
        try:  # before the work, not after
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot write images to {out}: {e.strerror or e}") from e
        self.stop.clear()
        images = self.engine.generate([prompt], gen or self.cfg.gen, generator or self.generator, on_position,
                                      self.stop)
        return images, self.engine.save_pngs(images, self.cfg.out_dir, prompt)
