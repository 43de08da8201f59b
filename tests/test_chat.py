"""`python -m mllm.chat` on a tiny random export: a piped session covering every command and bad
input, the one-shot modes, Ctrl-C through a pty, and the engine/session pieces (`mllm.engine`) in-process."""
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.launch import ROOT

CHAT = [sys.executable, "-m", "mllm.chat"]


def make_tiny_export(root: Path, max_positions: int = 512) -> tuple[Path, Path]:
    """A debug-preset UniTok folder and a random tiny MLLM export (with the tiny text tokenizer).

    Returns (export dir, tokenizer dir). Images of 32 px give a 2 x 2 code grid (4 positions)."""
    import mllm  # noqa: F401
    from mllm import UniMLLMForCausalLM
    from mllm.data.tiny_tokenizer import make_llama_tokenizer
    from mllm_tiny import tiny_config
    from unitok import UniTok, preset

    torch.manual_seed(0)
    UniTok(preset("debug")).save_pretrained(root / "tok")
    make_llama_tokenizer(root / "export")
    UniMLLMForCausalLM(tiny_config(vocab_size=512, max_position_embeddings=max_positions)).save_pretrained(
        root / "export")
    return root / "export", root / "tok"


def with_context(export: Path, dst: Path, max_positions: int) -> Path:
    """A copy of `export` whose config allows `max_positions` positions."""
    shutil.copytree(export, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = max_positions
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (":" + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run far faster single-threaded (no spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    export, tok = make_tiny_export(d)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(d / "photo.png")  # not square
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(d / "big.png")
    (d / "notes.png").write_text("this is not a PNG")
    (d / "folder").mkdir()
    return {"dir": d, "export": export, "tok": tok}


def base_args(a, export=None, out=None, *extra):
    """Loading flags, and --out-dir except for --ask (which writes no PNGs: the flag would be refused)."""
    out_dir = [] if "--ask" in extra else ["--out-dir", str(out or a["dir"] / "out")]
    return ["--model", str(export or a["export"]), "--tokenizer", str(a["tok"]), "--image-size", "32", "--device",
            "cpu", *out_dir, "--max-image-pixels", "10000", *extra]


def test_session_commands_and_bad_input(assets):
    """One piped session: every command, every bad-input case with its message, and the session lives on."""
    from mllm.data.tiny_tokenizer import load_llama_tokenizer

    d = assets["dir"]
    long_q = "What color is the shape? " * 25
    n_long = len(load_llama_tokenizer(assets["export"])(long_q, add_special_tokens=False)["input_ids"])
    assert 2 * n_long + 200 > 512 - 60 and n_long + 200 < 512 - 60  # premise: two long turns cannot share 512
    huge = "word " * 700
    lines = [
        "/help",
        f"/image {d / 'photo.png'}",
        "What shape is in the image?",
        f"/image {d / 'missing.png'}",
        f"/image {d / 'notes.png'}",
        f"/image {d / 'big.png'}",
        f"/image {d / 'folder'}",
        "/image",
        "",
        "/gen",
        "/gen   ",
        "/gen a red circle on a blue background",
        "/frobnicate now",
        huge,
        "What about <image> here?",
        long_q,
        long_q,
        "/reset",
        "Is it still there?",
        "/quit",
        "this line is never read",
    ]
    p = subprocess.run(CHAT + base_args(assets, None, None, "--max-new-tokens", "200"), input="\n".join(lines) + "\n",
                       capture_output=True, text=True, cwd=ROOT, env=env(), timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    expected = [
        "commands:",
        "[attached 1 image(s); 1 will go with your next question]",
        "assistant: ",
        f"error: no such file: {d / 'missing.png'}",
        f"error: not an image file: {d / 'notes.png'}",
        f"error: image too large: {d / 'big.png'} is 120x120 = 14,400 pixels, over the limit of 10,000",
        f"error: not a file: {d / 'folder'}",
        "error: usage: /image PATH [PATH ...]",
        "error: empty input",
        "error: empty prompt",
        "error: empty prompt",
        str(d / "out"),
        "error: unknown command /frobnicate (type /help)",
        "error: question too long",
        "error: the text <image> is reserved",
        "assistant: ",
        "[context: dropped the 1 oldest exchange(s) to fit the 512-token window]",
        "assistant: ",
        "[conversation reset]",
        "assistant: ",
    ]
    pos = 0
    for e in expected:  # in this order, each after the previous one
        i = out.find(e, pos)
        assert i >= 0, f"{e!r} not found after position {pos}:\n{out[pos:pos + 2000]}"
        pos = i + len(e)
    assert "this line is never read" not in out and out.count("error:") == 11
    # /gen wrote one PNG of the tokenizer's resolution, and printed its absolute path
    pngs = sorted((d / "out").glob("*.png"))
    assert len(pngs) == 1 and str(pngs[0]) in out and "a-red-circle-on-a-blue-background" in pngs[0].name
    assert Image.open(pngs[0]).size == (32, 32)
    # the question too long line reports the real length and the 512 window
    m = re.search(r"question too long: (\d+) tokens with its images, beyond the model's context of 512", out)
    assert m and int(m.group(1)) > 700


def test_one_shot_modes(assets):
    """--ask and --generate print only the answer / the paths and exit 0."""
    d = assets["dir"]
    runs = {
        "ask": base_args(assets, None, None, "--ask", "What is in the image?", "--image", str(d / "photo.png"),
                         "--max-new-tokens", "12"),
        "gen": base_args(assets, None, d / "gen", "--generate", "a green square", "--num-images", "2",
                         "--cfg-scale", "3.0", "--seed", "1"),
    }
    procs = {k: subprocess.Popen(CHAT + v, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                 env=env()) for k, v in runs.items()}  # concurrently: startup dominates
    res = {k: (*p.communicate(timeout=240)[::-1], p.returncode) for k, p in procs.items()}
    res = {k: (rc, out, err) for k, (err, out, rc) in res.items()}
    rc, out, err = res["ask"]
    assert rc == 0, err[-2000:]
    assert out.endswith("\n") and out.count("\n") == 1 and "error" not in out  # exactly the answer line
    rc, out, err = res["gen"]
    assert rc == 0, err[-2000:]
    paths = [Path(x) for x in out.split()]
    assert len(paths) == 2 and all(p.is_file() and p.parent == (d / "gen").resolve() for p in paths)
    a, b = (np.asarray(Image.open(p)) for p in paths)
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)  # two samples, not one image twice


def test_one_shot_bad_input_exits_1(assets, capsys):
    """Bad one-shot input: exit status 1, one error line on stderr, nothing on stdout (main() in-process)."""
    from mllm.chat import main

    d = assets["dir"]
    assert main(base_args(assets, None, None, "--ask", "What is it?", "--image", str(d / "notes.png"))) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1] == f"error: not an image file: {d / 'notes.png'}"
    assert main(base_args(assets, None, None, "--generate", "  ")) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines()[-1].startswith("error: empty prompt")
    assert main(base_args(assets, None, None, "--ask", "x" * 10, "--image", str(d / "nope.png"))) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no such file: {d / 'nope.png'}"
    with pytest.raises(SystemExit):  # ChatConfig: --image does not go with --generate
        main(base_args(assets, None, None, "--generate", "a cat", "--image", str(d / "photo.png")))


@pytest.mark.parametrize("mode,flags,message", [
    (["--ask", "q"], ["--temperature", "0"], "--temperature does not apply to --ask"),
    (["--ask", "q"], ["--out-dir", "x", "--num-images", "2"], "--num-images, --out-dir do not apply to --ask"),
    (["--ask", "q"], ["--candidates", "4"], "--candidates does not apply to --ask"),
    (["--generate", "p"], ["--max-new-tokens", "9"], "--max-new-tokens does not apply to --generate"),
    (["--generate", "p"], ["--answer-temperature", "0.5"], "--answer-temperature does not apply to --generate"),
    (["--generate", "p"], ["--image", "a.png"], "--image goes with --ask or an interactive session"),
    (["--generate", "p"], ["--ask", "q"], "--ask and --generate are two one-shot modes"),
])
def test_flags_of_another_mode_are_errors(mode, flags, message, capsys):
    """A flag the chosen one-shot mode would ignore stops the command line, naming the flag."""
    from mllm.chat import parse_args

    base = ["--model", "m", "--tokenizer", "t"]
    with pytest.raises(SystemExit) as e:
        parse_args([*base, *mode, *flags])
    assert e.value.code == 2 and message in " ".join(capsys.readouterr().err.replace("│", "").split())
    assert parse_args([*base, *mode]).one_shot  # the same mode without them is fine
    if "--ask" not in flags:  # and an interactive session reads them all
        assert not parse_args([*base, *flags]).one_shot


def _read_until(fd, buf: bytearray, pattern: bytes, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pattern in buf:
            return True
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return pattern in buf
            if not chunk:
                return pattern in buf
            buf += chunk
    return pattern in buf


def test_ctrl_c_stops_generation_not_session(assets, tmp_path):
    """Ctrl-C typed on the terminal during /gen stops that generation; the session keeps answering."""
    from unitok.image_io import MAX_PIXELS

    # 1024 px -> 64 x 64 = 4096 positions (x 4 images): far longer than the time to press Ctrl-C
    export = with_context(assets["export"], tmp_path / "long", 8192)
    args = CHAT + base_args(assets, export, tmp_path / "out", "--max-image-pixels", str(MAX_PIXELS))
    args[args.index("--image-size") + 1] = "1024"
    args += ["--num-images", "4"]
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal, so ^C becomes SIGINT
        os.chdir(ROOT)
        os.execvpe(args[0], args, env())
    buf = bytearray()
    try:
        assert _read_until(fd, buf, b"you> ", 120), buf.decode(errors="replace")
        os.write(fd, b"/gen a red circle\n")
        assert _read_until(fd, buf, b"generating: position", 60), buf.decode(errors="replace")
        t0 = time.time()
        os.write(fd, b"\x03")
        assert _read_until(fd, buf, b"[stopped: no images written]", 30), buf.decode(errors="replace")
        assert time.time() - t0 < 20
        assert _read_until(fd, buf, b"you> ", 10)
        os.write(fd, b"/help\n")
        assert _read_until(fd, buf, b"/reset", 10)  # still alive and answering
        os.write(fd, b"/quit\n")
        deadline = time.time() + 30
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            _read_until(fd, buf, b"\x00never", 0.2)  # keep draining the pty
        assert done and os.waitstatus_to_exitcode(status) == 0, buf.decode(errors="replace")
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        os.close(fd)
    assert not list((tmp_path / "out").glob("*.png"))


# ---- in-process: engine and session ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(assets):
    from mllm.engine import EngineConfig, MLLMEngine

    return MLLMEngine.load(EngineConfig(model=str(assets["export"]), tokenizer=str(assets["tok"]), device="cpu",
                                        image_size=32, max_image_pixels=10_000))


def test_preprocess_pads_with_release_color_and_encodes(engine):
    from unitok.image_io import PAD_COLOR, pad_to_square

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = pad_to_square(img)
    assert sq.size == (40, 40)
    px = np.asarray(sq)
    assert tuple(px[0, 0]) == PAD_COLOR == (122, 116, 104) and tuple(px[20, 20]) == (255, 0, 0)
    assert tuple(px[9, 20]) == PAD_COLOR and tuple(px[10, 20]) == (255, 0, 0) and tuple(px[30, 20]) == PAD_COLOR
    x = engine.preprocess(img)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 16, 16], torch.tensor([1.0, -1.0, -1.0]))  # red centre
    codes = engine.encode_images([img, Image.new("RGB", (16, 64), (0, 0, 255))])
    assert [tuple(c.shape) for c in codes] == [(4, 2, 2), (4, 2, 2)] and codes[0].device.type == "cpu"


def test_candidates_keep_the_sample_the_tokenizer_scores_highest(engine, monkeypatch):
    """--candidates N: the same samples as N times the images (same seed), and per image the candidate with
    the highest UniTok text-image score against its own prompt is kept."""
    from mllm.engine import ImageGenConfig
    from unitok.evaluate import to_uint8

    prompts, n = ["a red square", "a blue circle"], 3
    every = engine.generate(prompts, ImageGenConfig(cfg_scale=2.0, num_images=2 * n), torch.Generator().manual_seed(1))
    seen = {}
    score = engine.text_image_scores

    def recording(pix, texts):
        seen["pix"], seen["texts"], seen["scores"] = pix, texts, score(pix, texts)
        return seen["scores"]

    monkeypatch.setattr(engine, "text_image_scores", recording)
    kept = engine.generate(prompts, ImageGenConfig(cfg_scale=2.0, num_images=2, candidates=n),
                           torch.Generator().manual_seed(1))
    assert kept.shape == (4, 32, 32, 3) and kept.dtype == np.uint8
    assert seen["texts"] == [p for p in prompts for _ in range(2 * n)]  # each candidate scored against its prompt
    np.testing.assert_array_equal(np.stack([to_uint8(x) for x in seen["pix"]]), every)  # the plain samples
    best = seen["scores"].view(4, n).argmax(1)
    assert len(set(seen["scores"].tolist())) == 4 * n and best.tolist() != [0] * 4  # not always the first
    for i, b in enumerate(best.tolist()):
        np.testing.assert_array_equal(kept[i], every[i * n + b])
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        ImageGenConfig(candidates=0)


def test_stream_decoder_matches_full_decode(engine):
    from mllm.engine import StreamDecoder

    tok = engine.text_tokenizer
    ids = tok("The quick brown fox jumps over the lazy dog. 0123", add_special_tokens=False)["input_ids"]
    ids += tok("\u00e9t\u00e9 \u2603", add_special_tokens=False)["input_ids"]  # multi-byte pieces (byte fallback)
    dec = StreamDecoder(tok, {engine.eos_id})
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True).lstrip()
    assert not any("\ufffd" in x for x in deltas)  # incomplete UTF-8 is held back, never printed
    assert dec.push(engine.eos_id) == "" and dec.finished and dec.push(ids[0]) == ""


def test_session_trims_oldest_first_and_keeps_images(engine):
    from mllm.engine import ChatSession, InputError

    conv = ChatSession(engine)
    conv.attach_codes(engine.encode_images([Image.new("RGB", (32, 32), (0, 255, 0))]))
    t = conv.prepare("What color?", 16)
    assert t.dropped == 0 and len(t.sample.images) == 1 and t.question.startswith("<image>\n")
    assert t.sample.expanded_length() == len(t.sample.input_ids) + 3  # one placeholder -> 4 positions
    conv.commit(t, "Green.")
    assert conv.pending == [] and len(conv.history) == 1
    filler = "What color is the shape? " * 20
    for i in range(3):
        t = conv.prepare(filler, 200)
        assert t.sample.expanded_length() + t.max_new_tokens <= engine.context_length
        conv.commit(t, f"Reply {i}.")
    assert t.dropped >= 1 and conv.history[-1].answer == "Reply 2." and len(conv.history) < 4
    assert all(not ex.images for ex in conv.history)  # the image went with the first, dropped exchange
    with pytest.raises(InputError, match="question too long"):
        conv.prepare("word " * 700, 8)
    with pytest.raises(InputError, match="empty question"):
        conv.prepare("   ", 8)


def test_answer_stops_when_asked_and_streams(engine):
    """A set stop event ends the answer after the current step; the streamed text is the reply."""
    from mllm.engine import ChatSession

    turn = ChatSession(engine).prepare("Describe a long story about shapes.", 64)
    full = engine.answer([turn.sample], 64)[0]
    stop = threading.Event()
    pieces: list[str] = []

    def on_text(delta):
        pieces.append(delta)
        stop.set()

    short = engine.answer([turn.sample], 64, on_text=on_text, stop=stop)[0]
    assert stop.is_set() and len(pieces) == 1 and short == pieces[0].strip()
    assert full.startswith(short) and len(full) > len(short)  # same greedy path, cut after one step


def test_official_mllm_folder_loads_through_the_engine(assets, engine, tmp_path, monkeypatch):
    """--official-mllm: a released-layout folder (mini_gemini config + safetensors) with --text-tokenizer
    answers exactly like the export it was written from."""
    from safetensors.torch import save_file

    import mllm.modeling.official as official
    from mllm.engine import ChatSession, EngineConfig, MLLMEngine

    c = engine.model.config
    llama = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                        "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}
    (tmp_path / "config.json").write_text(json.dumps({**llama, "model_type": "mini_gemini",
                                                      "architectures": ["MiniGeminiLlamaForCausalLM"]}))
    save_file({k: v.contiguous() for k, v in engine.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    # the release hard-codes 7B embedder/depth-head shapes; give the tiny ones instead
    orig = official.config_from_official
    shapes = ("num_codebooks", "codebook_size", "code_dim", "embed_width", "embed_num_heads", "depth_num_layers",
              "depth_hidden_size", "depth_num_heads", "depth_intermediate_size")
    monkeypatch.setattr(official, "config_from_official",
                        lambda d: type(c)(**{**orig(d).to_dict(), **{k: getattr(c, k) for k in shapes}}))
    off = MLLMEngine.load(EngineConfig(model=str(tmp_path), tokenizer=str(assets["tok"]), official_mllm=True,
                                       text_tokenizer=str(assets["export"]), device="cpu", image_size=32))
    img = engine.encode_images([Image.open(assets["dir"] / "photo.png")])
    conv_a, conv_b = ChatSession(engine), ChatSession(off)
    conv_a.attach_codes(img)
    conv_b.attach_codes(img)
    a = engine.answer([conv_a.prepare("What is it?", 12).sample], 12)
    b = off.answer([conv_b.prepare("What is it?", 12).sample], 12)
    assert a == b
    with pytest.raises(FileNotFoundError, match="--text-tokenizer"):
        MLLMEngine.load(EngineConfig(model=str(tmp_path), tokenizer=str(assets["tok"]), official_mllm=True,
                                     device="cpu"))


def test_bf16_weights_answer_and_generate(assets):
    """--dtype bf16: the MLLM runs in bf16 on CPU too, the image tokenizer stays fp32 (its quantizer path
    requires it); answering and text-to-image both work from the same export."""
    from mllm.engine import ChatSession, EngineConfig, ImageGenConfig, MLLMEngine

    eng = MLLMEngine.load(EngineConfig(model=str(assets["export"]), tokenizer=str(assets["tok"]), device="cpu",
                                       image_size=32, dtype="bf16"))
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in eng.image_tokenizer.parameters()} == {torch.float32}
    session = ChatSession(eng)
    session.attach_codes(eng.encode_images([Image.new("RGB", (40, 24), (255, 0, 0))]))
    reply = session.answer(session.prepare("What is shown?", max_new_tokens=4))
    assert 1 <= reply.num_tokens <= 4
    images = eng.generate(["a red square"], ImageGenConfig(cfg_scale=2.0), torch.Generator().manual_seed(0))
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8


def test_an_export_refuses_another_tokenizer(assets, tmp_path):
    """An export records the fingerprint of the tokenizer whose codes it was trained on (mllm.train); chat with
    another tokenizer read and drew images with other codes, silently."""
    from mllm.engine import EngineConfig, MLLMEngine
    from unitok import load_tokenizer

    cfg = json.loads((assets["export"] / "config.json").read_text())
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(assets["export"] / name)
    (tmp_path / "config.json").unlink()
    right = load_tokenizer(assets["tok"]).fingerprint()
    kw = dict(tokenizer=str(assets["tok"]), text_tokenizer=str(assets["export"]), device="cpu", image_size=32)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tokenizer_fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match=rf"trained on the codes of tokenizer 0{{16}}, but --tokenizer .* \(--attn-mode "
                                         rf"full\) is tokenizer {right}"):
        MLLMEngine.load(EngineConfig(model=str(tmp_path), **kw))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tokenizer_fingerprint": right}))
    assert MLLMEngine.load(EngineConfig(model=str(tmp_path), **kw)).image_tokenizer.fingerprint() == right


def test_a_reply_holding_the_image_placeholder_does_not_break_the_next_turn(engine):
    """The placeholder marks the user's images; a reply that says it (the text is free) is stored without it,
    or the next prompt would count one image too many."""
    from mllm.engine import ChatSession

    conv = ChatSession(engine)
    conv.commit(conv.prepare("What is it?", 8), "Look at <image> here.")
    assert conv.history[0].answer == "Look at  here."
    turn = conv.prepare("And now?", 8)  # raised ValueError (1 placeholder, 0 images), which ended the chat
    assert turn.sample.images == [] and conv.answer(turn).num_tokens <= 8


def test_a_reply_spelling_a_control_token_does_not_break_the_next_turns(engine):
    """The model can write "</s>" out of ordinary pieces (explaining HTML); stored as said, every later prompt
    was refused ("a message contains the text tokenizer's control token") until /reset."""
    from mllm.engine import ChatSession

    conv = ChatSession(engine)
    conv.commit(conv.prepare("How is text struck through?", 8), "Use <s>old</s> for that.")
    assert conv.history[0].answer == "Use old for that."
    turn = conv.prepare("And bold?", 8)
    assert conv.answer(turn).num_tokens <= 8


def test_generated_images_never_overwrite_each_other(engine, tmp_path, monkeypatch):
    """Names were checked with exists() and then written: two processes in one second (parallel --generate runs
    into one folder) both took the same name, one image was lost and both printed its path."""
    from mllm.engine import MLLMEngine

    monkeypatch.setattr("time.strftime", lambda fmt: "20261206-120000")
    (tmp_path / "20261206-120000-a-cat-0.png").write_bytes(b"the other process's image")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the other process took the name after this check
    paths = MLLMEngine.save_pngs(np.zeros((2, 4, 4, 3), np.uint8), tmp_path, "a cat")
    monkeypatch.undo()
    assert [p.name for p in paths] == ["20261206-120000-a-cat-0-1.png", "20261206-120000-a-cat-1.png"]
    assert (tmp_path / "20261206-120000-a-cat-0.png").read_bytes() == b"the other process's image"
    assert all(Image.open(p).size == (4, 4) for p in paths)


def test_ctrl_c_while_an_image_is_read_keeps_the_session(engine, monkeypatch):
    """Ctrl-C while /image read a large photo ended the chat with a traceback (the help says it never does)."""
    import io

    from mllm.chat import TerminalChat
    from mllm.engine import SessionConfig

    chat = TerminalChat(engine, SessionConfig(), out=io.StringIO())
    lines = iter(["/image big.png", "/help", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(chat.session, "attach", lambda paths: (_ for _ in ()).throw(KeyboardInterrupt()))
    chat.run()  # returned at /quit: it raised KeyboardInterrupt out of run()
    text = chat.out.getvalue()
    assert "[stopped]" in text and "/reset" in text and chat.session.pending == []


def test_an_answer_ends_at_the_image_marker_with_a_notice(engine, monkeypatch):
    """The image-start marker ends an answer (what follows are image codes read as text: NUL / SOH characters
    in the reply) and the session says how to draw. Made to happen: the marker is the token the tiny model
    gives first."""
    from mllm.engine import ChatSession

    conv = ChatSession(engine)
    turn = conv.prepare("What is it?", 8)
    first = engine.answer_ids([turn.sample], 1)[0][0]
    monkeypatch.setattr(engine.model.config, "boi_token_id", first)
    streamed: list[str] = []
    reply = conv.answer(turn, on_text=streamed.append)
    assert (reply.text, reply.num_tokens, streamed) == ("", 0, [])
    assert reply.notices == ["[the model began an image: answers are text; /gen PROMPT draws images]"]
    ended: list = []
    assert engine.answer_ids([turn.sample], 8, stopped_by=ended) == [[]] and ended == [first]


def test_batch_answers_stay_inside_the_context(assets, engine, tmp_path):
    """Evaluation's batched answers (no session trimming): a row ends where prompt + answer fill the context,
    and a prompt that fills it alone is refused, not run past the position table."""
    from mllm.data.templates import chat_prompt
    from mllm.engine import EngineConfig, MLLMEngine

    def prompt(text):
        return chat_prompt(engine.text_tokenizer, [text], images=[], template="vicuna_v1")

    short = prompt("Hi?")
    ctx = len(short.input_ids) + 6
    mid = next(s for k in range(1, 40) if ctx - 3 <= len((s := prompt("Hi? " + "word " * k)).input_ids) < ctx)
    small = MLLMEngine.load(EngineConfig(model=str(with_context(assets["export"], tmp_path / "e", ctx)),
                                         tokenizer=str(assets["tok"]), device="cpu", image_size=32))
    ids = small.answer_ids([short, mid], 200)
    room = [ctx - len(s.input_ids) for s in (short, mid)]
    assert all(len(i) <= r for i, r in zip(ids, room)), (room, [len(i) for i in ids])
    with pytest.raises(ValueError, match=f"fill the model's context of {ctx}"):
        small.answer_ids([short, prompt("word " * 60)], 4)


def test_a_reply_cut_mid_character_is_stored_as_streamed(engine):
    ids = engine.text_tokenizer.encode("caf\u00e9", add_special_tokens=False)
    byte_ids = engine.text_tokenizer.convert_tokens_to_ids(["<0xC3>"])  # the first byte of a 2-byte character
    assert engine.decode(ids) == "caf\u00e9" and engine.decode(ids[:-1] + byte_ids) == "caf"


def test_top_p_keeps_the_smallest_set_reaching_p_as_transformers():
    """Per row, the tokens sampling can draw are the ones transformers' TopPLogitsWarper keeps (as many where
    probabilities tie). Equal logits make the cumulative sums exact: at p 0.5 over four equal tokens two are
    kept (three were)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from mllm.generate import SamplingConfig, sample_logits

    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.3, 0.2, 1e-9], [0.1, 0.6, 0.3, 1e-9]]).log()
    logits[0] = 0.0
    for p in (0.25, 0.5, 0.6, 0.75, 0.95, 1e-3):
        hf = TopPLogitsWarper(p)(None, logits.clone()).isfinite()
        seen = torch.zeros_like(hf)
        for seed in range(300):
            got = sample_logits(logits, SamplingConfig(temperature=1.0, top_p=p), torch.Generator().manual_seed(seed))
            seen[torch.arange(3), got] = True
        assert seen.sum(1).tolist() == hf.sum(1).tolist() and torch.equal(seen[1:], hf[1:]), (p, seen, hf)


def test_answers_run_one_forward_per_token(engine):
    """Prefill, then one step per token after the first: the token at the limit needs none."""
    from mllm.engine import ChatSession

    turn = ChatSession(engine).prepare("Describe shapes.", 5)
    calls = []
    handle = engine.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        ids = engine.answer_ids([turn.sample], 5)[0]
    finally:
        handle.remove()
    assert len(calls) == (5 if len(ids) == 5 else len(ids) + 1), (len(ids), len(calls))  # was 6 for 5 tokens


def test_load_names_what_is_wrong_with_the_model_folder(assets, tmp_path):
    from mllm.engine import EngineConfig, MLLMEngine

    def load(folder):
        return MLLMEngine.load(EngineConfig(model=str(folder), tokenizer=str(assets["tok"]), device="cpu"))

    run = tmp_path / "run"
    run.mkdir()
    (run / "latest").write_text("step-00000010")
    with pytest.raises(FileNotFoundError, match=r"a training run folder: its export is .*run/export"):
        load(run)
    llama = tmp_path / "llama"
    shutil.copytree(assets["export"], llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model, not an MLLM export"):
        load(llama)  # AttributeError: 'LlamaConfig' object has no attribute 'num_codebooks'
    bare = tmp_path / "bare"
    shutil.copytree(assets["export"], bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load(bare)  # an OSError from transformers, which chat printed as a traceback
    # a text tokenizer path that is no folder went to the Hub (54 s of retries offline); a folder with only
    # tokenizer_config.json gave an empty vocabulary (every question encoded to nothing)
    for name in ("meta-llama/Llama-2-7b-hf", "tok_config_only"):
        (tmp_path / "tok_config_only").mkdir(exist_ok=True)
        shutil.copy(assets["export"] / "tokenizer_config.json", tmp_path / "tok_config_only")
        started = time.monotonic()
        with pytest.raises(FileNotFoundError, match=r"--text-tokenizer .*(no such folder|neither tokenizer.json)"):
            MLLMEngine.load(EngineConfig(model=str(assets["export"]), tokenizer=str(assets["tok"]), device="cpu",
                                         text_tokenizer=name if "/" in name else str(tmp_path / name)))
        assert time.monotonic() - started < 5


def test_images_go_where_they_can_be_written_and_reset_leaves_generation_alone(engine, tmp_path):
    from mllm.engine import ChatSession, GenerationStopped, InputError, SessionConfig
    from mllm.web import WebHandlers

    (tmp_path / "afile").write_text("x")
    conv = ChatSession(engine, SessionConfig(out_dir=str(tmp_path / "afile")))
    with pytest.raises(InputError, match="cannot write images to"):  # before generating, not after
        conv.generate("a red circle")
    conv = ChatSession(engine, SessionConfig(out_dir=str(tmp_path / "out")))
    conv.reset()  # no reply running: nothing to stop
    assert not conv.stop.is_set()
    h = WebHandlers(engine, SessionConfig(out_dir=str(tmp_path / "out")))
    items, status, _ = h.generate("a red circle", 1.0, 0.0, 0, 1.0, None, 1, 1, conv)  # an emptied seed box
    assert len(items) == 1 and status.startswith("saved 1 image(s)")

    def stopped(*args, **kwargs):
        raise GenerationStopped()

    conv.generate = stopped  # the browser's stop during a generation: a status line, not gradio's error box
    assert h.generate("a red circle", 1.0, 0.0, 0, 1.0, 0, 1, 1, conv)[:2] == ([], "[stopped: no images written]")
