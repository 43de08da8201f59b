"""Browser chat for the unified MLLM (gradio): ask about an uploaded image, generate images from a prompt.

    python -m mllm.web --model EXPORT_DIR --tokenizer TOKENIZER [--host 127.0.0.1] [--port 7860] [options]
        (python -m mllm.web --help: the loading flags of mllm.chat, the session flags, whose image
         settings --cfg-scale --temperature --top-k --top-p --num-images --candidates --seed are the sliders'
         initial values, --max-upload-mb and --upload-cache-hours)

Two tabs:
  Chat      upload an image (optional), type a question; answers stream in; the conversation is
            multi-turn per browser session (history trimmed to the context window, with the same
            notices as the terminal); "New conversation" resets it. Ask is greyed out while an answer
            streams; the question box can be filled meanwhile.
  Generate  prompt + sliders for cfg scale, temperature, top-k, top-p, seed, number of images and
            candidates per image (the UniTok's text-image score keeps the best);
            the images are shown and also written as PNGs under --out-dir. The seed box seeds each
            click, so a seed reproduces its images.
A browser session is one `mllm.engine.ChatSession` (a gr.State), exactly as a terminal session: its
history, the images attached to the next question, and its answer sampling generator, seeded from
--seed once when the session's first request arrives and never reseeded ("New conversation" keeps it).
This module is the gradio front end only. Both events share one queue (`concurrency_id="model"`, one
job at a time), so requests never interleave on the model. The server binds 127.0.0.1 unless --host
says otherwise; gradio analytics are off and the theme uses system fonts, so the page makes no outside
requests. Uploads reach the handler as stored (`image_input`), so `MLLMEngine.open_image` reads them as the
terminal does. gradio is imported lazily. Endpoints (gradio API names): /ask, /reset, /generate.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Annotated

import torch
from tyro.conf import OmitArgPrefixes, Suppress

from mllm.engine import (ChatSession, EngineConfig, GenerationStopped, ImageGenConfig, InputError, MLLMEngine,
                         SessionConfig)
from runtime.cli import parse


@dataclass
class WebConfig:
    """Server settings plus what to load and the session settings (whose gen fields are the sliders'
    initial values)."""

    engine: Annotated[EngineConfig, OmitArgPrefixes]
    """What to load."""
    session: Annotated[SessionConfig, OmitArgPrefixes] = field(
        default_factory=lambda: SessionConfig(out_dir="web_outputs"))
    """Answer and generation defaults of every browser session (the image settings and the seed are the
    Generate tab's initial values)."""
    host: str = "127.0.0.1"
    """Interface to bind (loopback by default: the app has no authentication)."""
    port: int = 7860
    """TCP port."""
    max_num_images: int = 8
    """Upper end of the number-of-images slider."""
    max_upload_mb: float | None = None
    """Largest upload the server accepts, in MB; None = 4 bytes per pixel of --max-image-pixels (an
    uncompressed RGBA image at that limit: 160 MB at the default 40 MP)."""
    upload_cache_hours: float = 24.0
    """Uploads and shown images in gradio's cache folder (GRADIO_TEMP_DIR, else /tmp/gradio) are deleted
    once this old (checked every hour, or as often as this is), and all of them when the server stops."""
    extra: Annotated[dict, Suppress] = field(default_factory=dict)
    """Extra keyword arguments for `Blocks.launch` (tests; not a flag)."""

    def __post_init__(self):
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_num_images < 1:
            raise ValueError("max_num_images must be >= 1")
        if self.max_upload_mb is not None and self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        if self.upload_cache_hours * 3600 < 1:
            raise ValueError(f"upload_cache_hours must be at least one second, got {self.upload_cache_hours}")

    def max_upload_bytes(self) -> int:
        """The upload limit gradio enforces (`launch(max_file_size=...)`)."""
        if self.max_upload_mb is None:
            return 4 * self.engine.max_image_pixels
        return int(self.max_upload_mb * 1_000_000)

    def delete_cache(self) -> tuple[int, int]:
        """gradio's `Blocks(delete_cache=(every_s, age_s))`: without it every upload stayed on disk for good."""
        age = round(self.upload_cache_hours * 3600)
        return min(age, 3600), age


def import_gradio():
    """gradio, imported on demand with analytics off; a clear error when it is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise SystemExit("mllm.web needs gradio, which is not installed: pip install gradio") from e
    return gr


def image_input(gr, **kwargs):
    """A gr.Image whose handler gets the uploaded file itself, so that `MLLMEngine.open_image` reads it as the
    terminal chat and extraction do. gr.Image's own preprocess opens every upload with PIL (a text file then
    fails with a bare "Error" badge) and converts a non-RGB one: alpha lost to black, not white, a grayscale
    or CMYK JPEG re-encoded lossily, a huge image decoded in full before --max-image-pixels is checked."""

    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    stock = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:  # already checked to lie in gradio's upload cache
            return payload.path
        return stock(payload)  # None, or a data: URL from an API client (type, mode as above)

    # on the instance: gradio's component metaclass writes a .pyi stub beside the module of any subclass
    image.preprocess = preprocess
    return image


def port_error(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None (checked before the model loads, which takes
    minutes; gradio would only fail after it, with a traceback)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host.strip("[]"), port))
    except OSError as e:
        return f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port, or --host)"
    return None


class WebHandlers:
    """The event handlers, free of gradio objects (so they can be called directly). `state` is the
    browser session's `ChatSession`, None before its first request."""

    def __init__(self, engine: MLLMEngine, cfg: SessionConfig):
        self.engine, self.cfg = engine, cfg

    def session(self, state: ChatSession | None) -> ChatSession:
        """The browser session's ChatSession, started (and its generator seeded) on first use."""
        return state if state is not None else ChatSession(self.engine, self.cfg)

    def ask(self, image_path: str | None, question: str, messages: list | None, state: ChatSession | None):
        """Stream (messages, session, status, accepted) updates while the answer is generated; accepted
        tells the UI to clear the question box and the upload (both are now in the conversation)."""
        messages = list(messages or [])
        session = self.session(state)
        before = list(session.pending)
        try:
            if image_path:
                session.attach([image_path])
            turn = session.prepare(question or "")
        except InputError as e:
            session.pending = before
            yield messages, session, f"error: {e}", False
            return
        notice = " ".join(turn.notices)
        shown = question.strip() + (f" [+{len(turn.images)} image(s)]" if turn.images else "")
        messages += [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        yield messages, session, notice, True
        deltas: queue.Queue = queue.Queue()
        done = object()
        result: dict = {}

        def work():  # the answer runs here; this generator turns its deltas into UI updates
            try:
                result["reply"] = session.answer(turn, on_text=deltas.put)
            except Exception as e:  # noqa: BLE001 - shown to the user, the server keeps running
                result["error"] = e
            deltas.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text, finished = "", False
        try:
            while (item := deltas.get()) is not done:
                text += item
                messages[-1] = {"role": "assistant", "content": text}
                if session.conversation == turn.conversation:  # after a reset the chat box is the new one's
                    yield messages, session, notice, True
            finished = True
        finally:  # also when gradio closes this generator (the client left): the model's one job ends here
            if not finished:
                session.stop.set()
            thread.join()
        if session.conversation != turn.conversation:
            yield [], session, "[conversation reset]", True
            return
        if "error" in result:
            messages[-1] = {"role": "assistant", "content": text + " [failed]"}
            yield messages, session, f"error: {result['error']}", True
            return
        reply = result["reply"]
        messages[-1] = {"role": "assistant", "content": reply.text}
        yield messages, session, " ".join(turn.notices + reply.notices), True

    def reset(self, state: ChatSession | None):
        """Empty chat and history; the session's sampling generator runs on, as in the terminal."""
        if state is not None:
            state.reset()
        return [], state, "[conversation reset]", None

    def generate(self, prompt: str, cfg_scale: float, temperature: float, top_k: float, top_p: float, seed: float,
                 num_images: float, candidates: float, state: ChatSession | None = None):
        """-> (gallery items [(PIL image, caption)], status, session)."""
        from PIL import Image

        session = self.session(state)
        try:
            gen = ImageGenConfig(cfg_scale=float(cfg_scale), temperature=float(temperature), top_k=int(top_k),
                                 top_p=float(top_p), num_images=int(num_images), candidates=int(candidates))
            seed = self.cfg.seed if seed is None else int(seed)  # an emptied seed box: the session's seed
            generator = torch.Generator(device=self.engine.device).manual_seed(seed)
            images, paths = session.generate(prompt or "", gen, generator)
        except (InputError, ValueError) as e:
            return [], f"error: {e}", session
        except GenerationStopped:
            return [], "[stopped: no images written]", session
        items = [(Image.fromarray(a), p.name) for a, p in zip(images, paths)]
        return items, f"saved {len(paths)} image(s): " + ", ".join(str(p) for p in paths), session


def build_app(engine: MLLMEngine, cfg: WebConfig):
    """The gradio Blocks app (not launched)."""
    gr = import_gradio()
    h = WebHandlers(engine, cfg.session)
    g = cfg.session.gen
    with gr.Blocks(title="UniTok MLLM", delete_cache=cfg.delete_cache()) as app:
        gr.Markdown("## UniTok MLLM\nAsk about an image, or generate images from a prompt.")
        session = gr.State(None)  # this browser session's ChatSession (both tabs)
        with gr.Tab("Chat", elem_id="tab-chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = image_input(gr, label="Image (optional, goes with the next question)",
                                        sources=["upload", "clipboard"], elem_id="image-input")
                with gr.Column(scale=2):
                    chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=360)
                    question = gr.Textbox(label="Question", placeholder="What is in the image?", lines=2,
                                          elem_id="question")
                    with gr.Row():
                        ask_btn = gr.Button("Ask", variant="primary", elem_id="ask-btn")
                        reset_btn = gr.Button("New conversation", elem_id="reset-btn")
                    chat_status = gr.Markdown(elem_id="chat-status")
            def ask(image_path, text, messages, state):
                # The question box and the upload are cleared once, when the question is accepted, not
                # on every streamed delta (that erased a follow-up typed while the answer streamed).
                # Ask stays greyed out until the answer ends: gradio drops a click on a pending event
                # without a word, so a live button would swallow the follow-up.
                cleared = False
                for msgs, st, status, accepted in h.ask(image_path, text, messages, state):
                    boxes = (None, "", gr.Button(interactive=False)) if accepted and not cleared else \
                        (gr.skip(), gr.skip(), gr.skip())
                    cleared = cleared or accepted
                    yield (msgs, st, status) + boxes

            ask_btn.click(ask, [image, question, chatbot, session],
                          [chatbot, session, chat_status, image, question, ask_btn],
                          api_name="ask", concurrency_id="model", concurrency_limit=1
                          ).then(lambda: gr.Button(interactive=True), None, ask_btn, queue=False)
            reset_btn.click(h.reset, session, [chatbot, session, chat_status, image], api_name="reset")
        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", placeholder="a red apple on a wooden table", lines=2,
                                        elem_id="gen-prompt")
                    # Each range includes its flag's value: gradio refuses a value outside the range, so
                    # Generate would fail on every click until the slider was moved.
                    cfg_scale = gr.Slider(0.0, max(20.0, g.cfg_scale), value=g.cfg_scale, step=0.5,
                                          label="CFG scale (1 = off)", elem_id="cfg-scale")
                    temperature = gr.Slider(0.0, max(2.0, g.temperature), value=g.temperature, step=0.05,
                                            label="Temperature", elem_id="temperature")
                    top_k = gr.Slider(0, max(engine.model.config.codebook_size, g.top_k), value=g.top_k, step=1,
                                      label="Top-k (0 = off)", elem_id="top-k")
                    top_p = gr.Slider(min(0.05, g.top_p), 1.0, value=g.top_p, step=0.01, label="Top-p (1 = off)",
                                      elem_id="top-p")
                    seed = gr.Number(value=cfg.session.seed, precision=0, label="Seed", elem_id="seed")
                    num = gr.Slider(1, cfg.max_num_images, value=min(g.num_images, cfg.max_num_images), step=1,
                                    label="Number of images", elem_id="num-images")
                    cands = gr.Slider(1, max(16, g.candidates), value=g.candidates, step=1, elem_id="candidates",
                                      label="Candidates per image (the tokenizer keeps its best match)")
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-btn")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", format="png")
                    gen_status = gr.Markdown(elem_id="gen-status")
            gen_btn.click(h.generate, [prompt, cfg_scale, temperature, top_k, top_p, seed, num, cands, session],
                          [gallery, gen_status, session], api_name="generate", concurrency_id="model",
                          concurrency_limit=1)
    return app


def parse_args(argv: list[str] | None = None) -> WebConfig:
    """Command line -> WebConfig; exits with status 2 and a message on bad flags."""
    return parse(WebConfig, argv, prog="python -m mllm.web", description=__doc__.split("\n\nTwo tabs:")[0])


def main(argv: list[str] | None = None) -> int:
    """Load the model and serve until interrupted; returns the exit status."""
    cfg = parse_args(argv)
    gr = import_gradio()
    if err := port_error(cfg.host, cfg.port):  # at once, not after the model has loaded
        print(f"error: {err}", file=sys.stderr)
        return 1
    torch.manual_seed(cfg.session.seed)
    try:
        engine = MLLMEngine.load(cfg.engine)
    except (OSError, ValueError) as e:  # a missing or damaged file, a folder of another kind
        print(f"error: {e}", file=sys.stderr)
        return 1
    app = build_app(engine, cfg)
    # System fonts: the default theme would fetch Google Fonts from the browser.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    early: list[int] = []  # a SIGTERM while the server starts: launch may have served requests already
    signal.signal(signal.SIGTERM, lambda signum, _: early.append(signum))
    try:
        app.queue().launch(server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False, theme=theme,
                           footer_links=[], max_file_size=cfg.max_upload_bytes(), prevent_thread_lock=True,
                           **cfg.extra)
    except OSError:  # gradio's message names its own environment variable, not our flag
        print(f"error: cannot serve on {cfg.host}:{cfg.port}: the port was taken while the model loaded "
              "(choose another --port)", file=sys.stderr)
        return 1
    print(f"serving on http://{cfg.host}:{cfg.port}", flush=True)  # only now: launch has bound the port
    # SIGTERM (kill, systemd, docker stop) stops it as Ctrl-C does: gradio's shutdown empties its cache.
    try:
        signal.signal(signal.SIGTERM, lambda *_: _interrupt())
        if early:
            raise KeyboardInterrupt
        app.block_thread()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:  # one that came before block_thread: the shutdown it makes of a Ctrl-C
        app.server.close()
    return 0


def _interrupt():
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
