"""Chat with the unified MLLM in a terminal: multi-turn questions about images, and text-to-image.

    python -m mllm.chat --model EXPORT_DIR --tokenizer TOKENIZER [options]     (python -m mllm.chat --help)
    one-shot (for scripts; prints only the answer / the PNG paths on stdout, exit 0):
        --ask "question" [--image PATH ...]        --generate "prompt"
    A flag that does not apply to the chosen mode is an error: the image-generation flags (--cfg-scale,
    --temperature, --top-k, --top-p, --num-images, --candidates, --out-dir) with --ask, the answer flags
    (--answer-temperature, --max-new-tokens) and --image with --generate.

Commands in the session:
    /image PATH [PATH ...]  attach images to the next question (quote paths with spaces)
    /gen PROMPT             generate --num-images images, decode them with the tokenizer, write PNGs
    /reset                  forget the conversation and any attached images
    /help, /quit            (Ctrl-D quits too; Ctrl-C stops a running generation, not the session)

This module is the terminal front end only (flags, the read-eval loop, Ctrl-C, pipes and one-shot
modes). What runs, the conversation state and its notices are `mllm.engine` (`MLLMEngine`,
`ChatSession`), which `mllm.web` shares; tests drive `TerminalChat` line by line through `handle()`.
Flags are the fields of `ChatConfig` (parsed by tyro, help from the field docstrings).
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterable, TextIO

import torch
from tyro.conf import OmitArgPrefixes, UseAppendAction, arg

from mllm.engine import ChatSession, EngineConfig, GenerationStopped, InputError, MLLMEngine, SessionConfig
from runtime.cli import parse, refuse_changed

# session fields that only image generation reads, and those that only answers read
GENERATION_FIELDS = ("gen.cfg_scale", "gen.temperature", "gen.top_k", "gen.top_p", "gen.num_images", "gen.candidates",
                     "out_dir")
ANSWER_FIELDS = ("answer_temperature", "max_new_tokens")

HELP = """commands:
  /image PATH [PATH ...]  attach image(s) to your next question
  /gen PROMPT             generate image(s) from PROMPT and save them as PNGs
  /reset                  start a new conversation
  /help                   show this help
  /quit                   leave (Ctrl-D works too; Ctrl-C stops a running generation)
anything else is a question for the model"""


@dataclass
class ChatConfig:
    """Everything the terminal chat needs: what to load, how the session answers and draws, and the
    one-shot mode (--ask or --generate) if any."""

    engine: Annotated[EngineConfig, OmitArgPrefixes]
    """What to load."""
    session: Annotated[SessionConfig, OmitArgPrefixes] = field(default_factory=SessionConfig)
    """How the conversation answers and draws."""
    ask: Annotated[str | None, arg(metavar="QUESTION")] = None
    """One-shot: answer QUESTION (about the --image files), print the answer and exit."""
    generate: Annotated[str | None, arg(metavar="PROMPT")] = None
    """One-shot: generate images from PROMPT, write PNGs under --out-dir, print their paths and exit."""
    image: Annotated[list[str], UseAppendAction, arg(metavar="PATH")] = field(default_factory=list)
    """Image for --ask, or attached to the first question of a session; repeat for several."""

    def __post_init__(self):
        if self.ask is not None and self.generate is not None:
            raise ValueError("--ask and --generate are two one-shot modes: give one of them")
        if self.ask is not None:
            refuse_changed(self.session, GENERATION_FIELDS, "to --ask (it answers and writes no images)")
        if self.generate is not None:
            if self.image:
                raise ValueError("--image goes with --ask or an interactive session, not --generate")
            refuse_changed(self.session, ANSWER_FIELDS, "to --generate (it answers no question)")

    @property
    def one_shot(self) -> bool:
        """--ask or --generate: answer or draw once, then exit."""
        return self.ask is not None or self.generate is not None


@contextlib.contextmanager
def sigint_sets(event: threading.Event):
    """While active, the first Ctrl-C sets `event` (the generation loop stops after its step); a second
    one raises KeyboardInterrupt as usual. Only the main thread may install signal handlers."""
    event.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TerminalChat:
    """A `ChatSession` behind a line-oriented interface: `handle(line)` runs one command or question and
    returns False when the session should end. Replies stream to `out`; notices and one-line errors go
    to `msg` (the same stream in interactive use; stderr in one-shot mode)."""

    def __init__(self, engine: MLLMEngine, cfg: SessionConfig, out: TextIO | None = None, msg: TextIO | None = None,
                 prefix: str = "assistant: ", progress: bool | None = None):
        self.session = ChatSession(engine, cfg)
        self.out = out or sys.stdout
        self.msg = msg or self.out
        self.prefix = prefix
        self.progress = self.out.isatty() if progress is None else progress

    # ---- output helpers --------------------------------------------------------------------------
    def _say(self, text: str, stream: TextIO | None = None) -> None:
        stream = stream or self.msg
        stream.write(text + "\n")
        stream.flush()

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def error(self, text: str) -> None:
        """One-line error; the session continues."""
        self._say(f"error: {text}")

    # ---- actions ---------------------------------------------------------------------------------
    def ask(self, question: str) -> str:
        """Answer `question` (with any attached images), streaming to `out`; returns the reply."""
        turn = self.session.prepare(question)
        for notice in turn.notices:
            self._say(notice)
        self._write(self.prefix)
        with sigint_sets(self.session.stop):
            reply = self.session.answer(turn, on_text=self._write)
        self._say("", self.out)
        for notice in reply.notices:
            self._say(notice)
        return reply.text

    def generate(self, prompt: str) -> list[Path]:
        """Generate the session's number of images for `prompt`, write PNGs, print their paths; [] if stopped."""
        last = [0.0]

        def on_position(t: int, total: int) -> None:
            now = time.monotonic()
            if self.progress and (now - last[0] > 0.25 or t == total):
                last[0] = now
                self.msg.write(f"\rgenerating: position {t}/{total}")
                self.msg.flush()

        try:
            with sigint_sets(self.session.stop):
                _, paths = self.session.generate(prompt, on_position=on_position)
        except (GenerationStopped, KeyboardInterrupt):
            self._say(("\n" if self.progress else "") + "[stopped: no images written]")
            return []
        if self.progress:
            self._say("")
        for p in paths:
            self._say(str(p), self.out)
        return paths

    # ---- dispatcher ------------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Run one input line; False means quit. User errors print one line and return True."""
        text = line.strip()
        try:
            if not text:
                raise InputError("empty input: type a question, or /help for commands")
            if not text.startswith("/"):
                self.ask(text)
                return True
            cmd, _, rest = text.partition(" ")
            rest = rest.strip()
            if cmd in ("/quit", "/exit"):
                return False
            if cmd == "/help":
                self._say(HELP)
            elif cmd == "/reset":
                self.session.reset()
                self._say("[conversation reset]")
            elif cmd == "/image":
                try:
                    paths = shlex.split(rest)
                except ValueError as e:
                    raise InputError(f"cannot parse the paths ({e}); quote paths with spaces") from None
                n = self.session.attach(paths)
                self._say(f"[attached {n} image(s); {len(self.session.pending)} will go with your next question]")
            elif cmd == "/gen":
                self.generate(rest)
            else:
                raise InputError(f"unknown command {cmd} (type /help)")
        except InputError as e:
            self.error(str(e))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.error("out of GPU memory: try fewer --num-images, a smaller --image-size or --dtype bf16")
        return True

    def run(self, lines: Iterable[str] | None = None) -> None:
        """The read-eval loop: from `lines`, or from input() with a prompt (Ctrl-D quits)."""
        self._say("UniTok MLLM chat. Type a question, /image PATH to attach an image, /gen PROMPT to draw, "
                  "/help for more.")
        if lines is not None:
            for line in lines:
                if not self.handle(line):
                    return
            return
        if sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                self._say("")
                return
            except KeyboardInterrupt:
                self._say("\n(Ctrl-C stops a running generation; /quit or Ctrl-D leaves)")
                continue
            try:
                if not self.handle(line):
                    return
            except KeyboardInterrupt:  # outside a generation (reading or encoding an image): the session stays
                self._say("\n[stopped]")  # (attach and a turn change nothing until they are done)


# ---- CLI ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> ChatConfig:
    """Command line -> ChatConfig; exits with status 2 and a message on bad flags."""
    return parse(ChatConfig, argv, prog="python -m mllm.chat", description=__doc__.split("\n\nThis module")[0])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input in one-shot mode)."""
    cfg = parse_args(argv)
    torch.manual_seed(cfg.session.seed)
    try:
        engine = MLLMEngine.load(cfg.engine)
    except (OSError, ValueError) as e:  # a missing or damaged file, a folder of another kind
        print(f"error: {e}", file=sys.stderr)
        return 1
    chat = TerminalChat(engine, cfg.session, out=sys.stdout, msg=sys.stderr if cfg.one_shot else sys.stdout,
                        prefix="" if cfg.one_shot else "assistant: ", progress=False if cfg.one_shot else None)
    if cfg.one_shot:
        try:
            if cfg.ask is not None:
                if cfg.image:
                    chat.session.attach(cfg.image)
                chat.ask(cfg.ask)
            else:
                if not chat.generate(cfg.generate):
                    return 1
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if cfg.image:
        try:
            chat.session.attach(cfg.image)
        except InputError as e:
            chat.error(str(e))
    chat.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
