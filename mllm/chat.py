"""Chat with the unified MLLM in a terminal: multi-turn questions about images, and text-to-image.

    python -m mllm.chat --model EXPORT_DIR --tokenizer TOKENIZER [--official-mllm] [--text-tokenizer DIR]
        [--attn-mode full|causal] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--image-size N]
        [--cfg-scale 7.0] [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--num-images 1]
        [--answer-temperature 0.0] [--max-new-tokens 256] [--seed 0] [--out-dir chat_outputs]
        [--max-image-pixels 40000000]
    one-shot (for scripts; prints only the answer / the PNG paths on stdout, exit 0):
        --ask "question" [--image PATH ...]        --generate "prompt"

Commands in the session:
    /image PATH [PATH ...]  attach images to the next question (quote paths with spaces)
    /gen PROMPT             generate --num-images images, decode them with the tokenizer, write PNGs
    /reset                  forget the conversation and any attached images
    /help, /quit            (Ctrl-D quits too; Ctrl-C stops a running generation, not the session)

This module is the terminal front end only (flags, the read-eval loop, Ctrl-C, pipes and one-shot
modes). What runs, the conversation state and its notices are `mllm.engine` (`MLLMEngine`,
`ChatSession`), which `mllm.web` shares; tests drive `TerminalChat` line by line through `handle()`.
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, TextIO

import torch

from mllm.engine import (ChatSession, EngineConfig, GenerationStopped, InputError, MLLMEngine, SessionConfig,
                         add_engine_args, add_generation_args, add_session_args, engine_config, session_config)

HELP = """commands:
  /image PATH [PATH ...]  attach image(s) to your next question
  /gen PROMPT             generate image(s) from PROMPT and save them as PNGs
  /reset                  start a new conversation
  /help                   show this help
  /quit                   leave (Ctrl-D works too; Ctrl-C stops a running generation)
anything else is a question for the model"""


@dataclass
class ChatConfig:
    """Everything the terminal chat needs."""

    engine: EngineConfig
    """What to load."""
    session: SessionConfig = field(default_factory=SessionConfig)
    """How the conversation answers and draws."""


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
            if not self.handle(line):
                return


# ---- CLI ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[ChatConfig, argparse.Namespace]:
    """Command line -> (ChatConfig, the raw namespace for the one-shot flags); exits on bad flags."""
    p = argparse.ArgumentParser(prog="python -m mllm.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_generation_args(p)
    add_session_args(p, out_dir="chat_outputs", seed_help="sampling seed for the session")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ask", metavar="QUESTION", help="one-shot: answer QUESTION (with --image) and exit")
    mode.add_argument("--generate", metavar="PROMPT", help="one-shot: generate images, print their paths, exit")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image(s) for --ask, or attached to the first question of a session")
    a = p.parse_args(argv)
    if a.generate is not None and a.image:
        p.error("--image goes with --ask or an interactive session, not --generate")
    try:
        cfg = ChatConfig(engine=engine_config(a), session=session_config(a))
    except ValueError as e:
        p.error(str(e))
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input in one-shot mode)."""
    cfg, a = parse_args(argv)
    torch.manual_seed(cfg.session.seed)
    try:
        engine = MLLMEngine.load(cfg.engine)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    one_shot = a.ask is not None or a.generate is not None
    chat = TerminalChat(engine, cfg.session, out=sys.stdout, msg=sys.stderr if one_shot else sys.stdout,
                        prefix="" if one_shot else "assistant: ", progress=False if one_shot else None)
    if one_shot:
        try:
            if a.ask is not None:
                if a.image:
                    chat.session.attach(a.image)
                chat.ask(a.ask)
            else:
                if not chat.generate(a.generate):
                    return 1
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if a.image:
        try:
            chat.session.attach(a.image)
        except InputError as e:
            chat.error(str(e))
    chat.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
