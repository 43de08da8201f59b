"""Stage-two data: templates (token-level masks), source readers, recipes, the mixture loader."""
from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mllm.data import templates as T
from mllm.data.collate import Sample, collate
from mllm.data.loader import MixtureLoader, format_stats
from mllm.data.recipe import Recipe, SourceConfig, load_recipe
from mllm.data.sources import CodeIndex, InstructionSource, PairSource, T2ISource, TextSource, split_json_list
from mllm.modeling.configuration import IMAGE_TOKEN_INDEX
from mllm.data.tiny_tokenizer import VOCAB_SIZE, load_llama_tokenizer, make_llama_tokenizer

K, H, W = 4, 2, 2  # debug-tokenizer code grid: 4 codebooks, 32 px -> 2 x 2 positions
SYSTEM = T.VICUNA_V1.system
SURROGATE = "broken emoji \ud83d here"  # a lone surrogate: json.loads accepts its escape, UTF-8 has no form of it


# ---- fixtures and writers --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return load_llama_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama_tok")))


def codes_for(i: int, hw=(H, W)) -> np.ndarray:
    return (np.arange(K * hw[0] * hw[1], dtype=np.uint16).reshape(K, *hw) + i) % 64


def npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def write_code_shard(path: Path, items: list[dict]) -> Path:
    """items: {key, codes (array) | codes_bytes, txt?, json?}; written with webdataset's TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as w:
        for it in items:
            s = {"__key__": it["key"]}
            if "codes" in it:
                s["codes.npy"] = npy(it["codes"])
            if "codes_bytes" in it:
                s["codes.npy"] = it["codes_bytes"]
            if "txt" in it:
                s["txt"] = it["txt"]
            if "json" in it:
                s["json"] = it["json"] if isinstance(it["json"], bytes) else json.dumps(it["json"]).encode()
            w.write(s)
    return path


def pair_items(n: int, start: int = 0, prefix: str = "img") -> list[dict]:
    return [{"key": f"{prefix}{i:05d}", "codes": codes_for(i), "txt": f"a red circle number {i}",
             "json": {"path": f"{prefix}/{i:05d}.jpg", "recaption": f"recaption {i}"}} for i in range(start, start + n)]


def write_jsonl(path: Path, docs: list, raw_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d) for d in docs] + list(raw_lines)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def cfg(kind: str, paths, **kw) -> SourceConfig:
    kw.setdefault("weight", 1.0)
    return SourceConfig(name=kw.pop("name", kind), kind=kind, paths=paths if isinstance(paths, list) else [paths], **kw)


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] is None or torch.equal(a[k], b[k]) for k in a)


# ---- tiny tokenizer ----------------------------------------------------------------------------------
def test_tiny_llama_tokenizer_layout(tok, tmp_path):
    from transformers import AutoTokenizer

    assert len(tok) == VOCAB_SIZE
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0x01>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok("\x00\x01", add_special_tokens=False).input_ids[-2:] == [3, 4]  # boi / eoi as bytes
    assert tok("hi").input_ids[0] == 1
    auto = AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path / "again"))
    assert auto("a red circle").input_ids == tok("a red circle").input_ids  # deterministic training


# ---- templates ---------------------------------------------------------------------------------------
def test_t2i_sample_layout_and_masks(tok):
    codes = codes_for(0)
    s = T.t2i_sample(tok, "  a red circle ", codes)
    body = T.encode(tok, "a red circle" + T.T2I_SUFFIX)
    assert s.input_ids == [1] + body + [3, IMAGE_TOKEN_INDEX, 4, 2]
    assert s.labels == [-100] * (1 + len(body)) + [3, -100, 4, 2]  # boi, eoi, eos supervised
    assert s.image_gen == [True] and s.images[0] is codes
    # the prompt equals the release's string form: prompt + suffix + "\x00" tokenised with bos
    assert T.t2i_prompt_ids(tok, "a red circle") == tok("a red circle" + T.T2I_SUFFIX + "\x00").input_ids
    assert T.t2i_prompt_ids(tok, "a red circle") == s.input_ids[:len(body) + 2]
    null = T.t2i_sample(tok, None, codes)
    assert T.null_prompt_ids(tok) == tok("<unconditional>\x00").input_ids
    assert null.input_ids == T.null_prompt_ids(tok) + [IMAGE_TOKEN_INDEX, 4, 2]
    assert [x for x in null.labels if x != -100] == [3, 4, 2]


def test_caption_and_text_samples(tok):
    s = T.caption_sample(tok, "a blue square", codes_for(1))
    cap = T.encode(tok, "a blue square")
    assert s.input_ids == [1, 3, IMAGE_TOKEN_INDEX, 4] + cap + [2]
    assert s.labels == [-100] * 4 + cap + [2] and s.image_gen == [False]
    (t,) = T.text_samples(tok, "The quick brown fox.")
    assert t.input_ids == [1] + T.encode(tok, "The quick brown fox.") + [2] and t.labels == t.input_ids
    long = "The quick brown fox jumps over the lazy dog. " * 10
    full = [1] + T.encode(tok, long) + [2]
    parts = T.text_samples(tok, long, max_len=16, overflow="split")
    # windows overlap by one token: each window's first token (never a target inside it) is the previous
    # window's last, so every token after bos is a target exactly once (the first of each window was lost)
    assert all(len(p.input_ids) == 16 for p in parts[:-1]) and 2 <= len(parts[-1].input_ids) <= 16
    assert parts[0].input_ids + sum((p.input_ids[1:] for p in parts[1:]), []) == full
    targets = sum(len(p.input_ids) - 1 for p in parts)  # the packed row ignores each sample's first label
    assert targets == len(full) - 1
    # a document one token over max_len: a second window of 2 tokens (its eos a target), not a lone [eos]
    doc = next(d for k in range(1, 200) if len([1] + T.encode(tok, d := "a" * k) + [2]) == 17)
    assert [len(p.input_ids) for p in T.text_samples(tok, doc, max_len=16)] == [16, 2]
    assert T.text_samples(tok, long, max_len=16, overflow="truncate")[0].input_ids == parts[0].input_ids
    assert T.text_samples(tok, long, max_len=16, overflow="skip") == []


def test_data_text_cannot_make_control_tokens(tok):
    """"<s>", "</s>" and NUL / SOH in data were tokenised as bos, eos and the image markers boi / eoi (3, 4)
    inside documents, captions, prompts and answers, and trained as such."""
    bos, eos, boi, eoi = 1, 2, 3, 4
    html = "HTML <s>struck</s> text with a \x00 NUL and \x01"
    (doc,) = T.text_samples(tok, html)
    assert doc.input_ids[0] == bos and doc.input_ids[-1] == eos
    assert not {bos, eos, boi, eoi} & set(doc.input_ids[1:-1])
    assert tok.decode(doc.input_ids[1:-1]) == "HTML <s>struck</s> text with a  NUL and "
    # text without them tokenises as before
    assert T.encode_plain(tok, "a red circle.") == T.encode(tok, "a red circle.")
    for s in (T.t2i_sample(tok, "a </s> b \x00", codes_for(0)), T.caption_sample(tok, "a <s> b \x01", codes_for(0))):
        body = [i for i in s.input_ids if i != IMAGE_TOKEN_INDEX]
        assert body.count(bos) == 1 and body.count(eos) == 1 and body.count(boi) == 1 and body.count(eoi) == 1
    conv = [{"from": "human", "value": "What ends a sequence?\x00"}, {"from": "gpt", "value": "The tag </s>."}]
    with pytest.raises(ValueError, match="control token '</s>'"):
        T.conversation_sample(tok, conv)
    conv[1]["value"] = "A tag."
    s = T.conversation_sample(tok, conv)
    assert boi not in s.input_ids and s.input_ids.count(eos) == 1
    with pytest.raises(ValueError, match="control token '<s>'"):
        T.chat_prompt(tok, ["what is <s>?"])


def _runs(sample: Sample) -> list[list[int]]:
    """Maximal runs of consecutive supervised positions (their ids)."""
    runs, cur = [], []
    for i, lab in zip(sample.input_ids, sample.labels):
        if lab != -100:
            assert lab == i  # supervised positions predict themselves (collate/model shift later)
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_vicuna_v1_masks_token_by_token(tok):
    conv = [{"from": "human", "value": "What shape is in the image?\n<image>"},  # placeholder moved to front
            {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "What color is the shape?"},
            {"from": "gpt", "value": "Red."}]
    s = T.conversation_sample(tok, conv, [codes_for(2)])
    # ids: exactly LLaVA's rendering, split at <image> and tokenised chunk by chunk
    chunk1 = SYSTEM + " USER: "
    chunk2 = ("\nWhat shape is in the image? ASSISTANT: A circle.</s>USER: What color is the shape? "
              "ASSISTANT: Red.</s>")
    ids2 = tok(chunk2, add_special_tokens=False).input_ids  # "</s>" in the text becomes eos
    assert s.input_ids == [1] + T.encode(tok, chunk1) + [IMAGE_TOKEN_INDEX] + ids2
    runs = _runs(s)
    assert len(runs) == 2
    for run, reply in zip(runs, ["A circle.", "Red."]):
        assert run[-1] == 2  # the turn's </s> is supervised
        assert tok.decode(run[:-1]).strip() == reply
    # each run starts right after the ":" of "ASSISTANT:" and nothing else is supervised
    for run in runs:
        start = next(i for i in range(len(s.input_ids)) if s.input_ids[i:i + len(run)] == run and s.labels[i] != -100)
        assert tok.convert_ids_to_tokens(s.input_ids[start - 1]) == ":"
        assert tok.decode(s.input_ids[start - 3:start]).strip().endswith("ASSISTANT:")
    assert sum(lab != -100 for lab in s.labels) == sum(map(len, runs))
    # the generation prompt is a prefix of the training ids
    p = T.chat_prompt(tok, ["<image>\nWhat shape is in the image?", "A circle.", "What color is the shape?"],
                      [codes_for(2)])
    assert s.input_ids[:len(p.input_ids)] == p.input_ids
    assert tok.decode(p.input_ids[-3:]).strip().endswith("ASSISTANT:")
    assert set(p.labels) == {-100} and len(p.images) == 1


def test_plain_template_and_conversation_errors(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a red circle"}]
    s = T.conversation_sample(tok, conv, [codes_for(3)], template="plain")
    body = tok("a red circle\n", add_special_tokens=False).input_ids
    assert s.input_ids == [1, IMAGE_TOKEN_INDEX] + body  # human turn reduced to its image
    assert s.labels == [-100, -100] + body  # caption + "\n" supervised
    # text-only chat works; an image without placeholder is put in front of the first user turn
    t = T.conversation_sample(tok, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])
    assert IMAGE_TOKEN_INDEX not in t.input_ids and _runs(t) and _runs(t)[0][-1] == 2
    u = T.conversation_sample(tok, [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "A square."}],
                              [codes_for(4)])
    assert u.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    with pytest.raises(ValueError, match="placeholders"):
        T.conversation_sample(tok, [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}],
                              [codes_for(0)] * 3)
    with pytest.raises(ValueError, match="alternate"):
        T.conversation_sample(tok, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(ValueError, match="last turn"):
        T.chat_prompt(tok, ["q", "a"])


def test_leading_system_turn_is_dropped(tok):
    conv = [{"from": "human", "value": "<image>\nShape?"}, {"from": "gpt", "value": "A circle."}]
    s = T.conversation_sample(tok, [{"from": "system", "value": "Be brief."}] + conv, [codes_for(0)])
    ref = T.conversation_sample(tok, conv, [codes_for(0)])
    assert (s.input_ids, s.labels) == (ref.input_ids, ref.labels)  # the template brings its own system prompt
    with pytest.raises(ValueError, match="unknown conversation role 'system'"):  # only a leading one
        T.conversation_sample(tok, conv[:1] + [{"from": "system", "value": "x"}] + conv[1:], [codes_for(0)])


def test_invalid_unicode_is_a_value_error(tok):
    # the fast tokenizer alone raises "TypeError: TextEncodeInput must be Union[...]"
    with pytest.raises(ValueError, match="not valid Unicode.*'broken emoji '"):
        T.text_samples(tok, SURROGATE)
    with pytest.raises(ValueError, match="not valid Unicode"):
        T.conversation_sample(tok, [{"from": "human", "value": SURROGATE}, {"from": "gpt", "value": "ok"}])


# ---- recipes -----------------------------------------------------------------------------------------
def test_recipe_validation_and_missing_path(tmp_path, monkeypatch):
    for i in range(3):
        write_jsonl(tmp_path / f"t/{i:02d}.jsonl", [{"text": "x"}])
    good = {"name": "r", "root": str(tmp_path),
            "sources": [{"name": "a", "kind": "text", "paths": "t/{00..02}.jsonl", "weight": 1}]}
    (tmp_path / "good.yaml").write_text(json.dumps(good))  # JSON is valid YAML
    r = load_recipe(tmp_path / "good.yaml")
    assert [p.name for p in r.files(r.sources[0])] == ["00.jsonl", "01.jsonl", "02.jsonl"] and r.mode == "weight"
    bad = dict(good, sources=[dict(good["sources"][0], paths="t/{00..03}.jsonl")])
    (tmp_path / "bad.yaml").write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "t" / "03.jsonl")):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="03.jsonl"):
        MixtureLoader(Recipe.from_dict(bad), None)
    with pytest.raises(ValueError, match="t2i_ratio"):  # an option of another kind
        Recipe.from_dict(dict(good, sources=[dict(good["sources"][0], t2i_ratio=0.5)]))
    with pytest.raises(ValueError, match="exactly one"):
        Recipe.from_dict(dict(good, sources=[dict(good["sources"][0], budget=5)]))
    mixed = [dict(good["sources"][0]), {"name": "b", "kind": "text", "paths": "t/00.jsonl", "budget": 3}]
    with pytest.raises(ValueError, match="every source"):
        Recipe.from_dict(dict(good, sources=mixed))
    with pytest.raises(ValueError, match="kind"):
        Recipe.from_dict(dict(good, sources=[dict(good["sources"][0], kind="video")]))
    # YAML reads 1e-3 as text (a bare TypeError before); an infinite weight made every draw the last source's
    for weight, why in (("1e-3", "weight must be a number, got '1e-3'"), (float("inf"), "finite number > 0")):
        with pytest.raises(ValueError, match=why):
            Recipe.from_dict(dict(good, sources=[dict(good["sources"][0], weight=weight)]))
    with pytest.raises(ValueError, match="must be path strings"):
        Recipe.from_dict(dict(good, sources=[dict(good["sources"][0], paths=[None])]))
    # roots: `~` (bash leaves it in --data-root=~/x) for plain and brace paths too; a `[` in the root's name is no
    # glob; a glob's folders are not files; an empty `root:` is the working folder (it was the folder "None")
    home = tmp_path / "home"
    (home / "my[data]" / "t" / "sub").mkdir(parents=True)
    write_jsonl(home / "my[data]" / "t" / "00.jsonl", [{"text": "x"}])
    monkeypatch.setenv("HOME", str(home))
    for paths in ("t/00.jsonl", "t/{00..00}.jsonl", "t/*"):
        r = Recipe.from_dict(dict(good, root="~/my[data]", sources=[dict(good["sources"][0], paths=paths)]))
        assert r.files(r.sources[0]) == [home / "my[data]" / "t" / "00.jsonl"], paths
    assert Recipe.from_dict(dict(good, root=None)).root == "."


# ---- source readers -------------------------------------------------------------------------------------
def test_text_reader_formats_and_counters(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "first doc"}, {"text": "   "}, {"text": "second doc"}],
                    raw_lines=['{"text": "broken', '{"other": 1}', ""])
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt") as f:
        f.write(json.dumps({"text": "gz doc"}) + "\n")
    src = TextSource(cfg("text", str(a), shuffle=False), [a, b], tok, max_len=64)
    assert [r.text for r in src] == ["first doc", "second doc", "gz doc"]
    st = src.stats()
    assert st["records"] == 3 and st["skipped"]["empty_text"] == 1 and st["skipped"]["malformed"] == 2
    samples = [s for s, _ in src.stream(infinite=False)]
    docs = ("first doc", "second doc", "gz doc")
    assert [s.input_ids for s in samples] == [[1] + T.encode(tok, d) + [2] for d in docs]
    skip = TextSource(cfg("text", str(a), text_overflow="skip"), [a], tok, max_len=3)
    assert list(skip.stream(infinite=False)) == [] and skip.stats()["skipped"]["too_long"] == 2
    for ext, pkg in (("jsonl.zst", "zstandard"), ("parquet", "pyarrow")):
        f = tmp_path / f"c.{ext}"
        f.write_bytes(b"")
        try:
            __import__(pkg)
        except ImportError:
            with pytest.raises(ImportError, match=pkg):
                TextSource(cfg("text", str(f)), [f], tok)


def test_invalid_unicode_records_are_skipped(tok, tmp_path):
    """A lone surrogate escape in scraped JSON skips its record as malformed (it stopped training)."""
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "good doc"}, {"text": SURROGATE}, {"text": "another doc"}])
    assert "\\ud83d" in t.read_text()
    text = TextSource(cfg("text", str(t), shuffle=False), [t], tok, max_len=64)
    assert [tok.decode(s.input_ids[1:-1]) for s, _ in text.stream(infinite=False)] == ["good doc", "another doc"]
    st = text.stats()
    assert st["skipped"]["malformed"] == 1 and st["examples"]["malformed"][0].startswith("t.jsonl:2")
    good = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    bad = {"id": "b", "conversations": [{"from": "human", "value": SURROGATE}, {"from": "gpt", "value": "ok"}]}
    j = tmp_path / "llava.json"
    j.write_text(json.dumps([good, bad, good]))  # a LLaVA JSON list
    inst = InstructionSource(cfg("instructions", str(j), shuffle=False), [j], tok, max_len=256)
    assert len(list(inst.stream(infinite=False))) == 2 and inst.stats()["skipped"]["malformed"] == 1
    assert "id=b" in inst.stats()["examples"]["malformed"][0]
    # split-json copies the record as it is (it raised UnicodeEncodeError); the reader then skips it
    (shard,) = split_json_list(j, tmp_path / "split")
    assert [json.loads(line) for line in shard.read_text().splitlines()] == [good, bad, good]
    again = InstructionSource(cfg("instructions", str(shard), shuffle=False), [shard], tok, max_len=256)
    assert len(list(again.stream(infinite=False))) == 2 and again.stats()["skipped"]["malformed"] == 1
    # a rerun with fewer shards left the earlier ones for the recipe's glob to read twice; an empty list wrote none
    assert len(split_json_list(j, tmp_path / "split2", per_shard=1)) == 3
    assert split_json_list(j, tmp_path / "split2", per_shard=1)[0].name == "00000.jsonl"  # the same split again
    with pytest.raises(FileExistsError, match=r"holds 2 .jsonl files this split does not write \(e.g. \['00001"):
        split_json_list(j, tmp_path / "split2", per_shard=10)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="the list is empty"):
        split_json_list(tmp_path / "empty.json", tmp_path / "split3")
    # a caption from the json member (caption_field), in both the caption and the text-to-image layout
    items = [{"key": f"k{i}", "codes": codes_for(i), "txt": "plain", "json": {"recaption": SURROGATE}}
             for i in range(2)]
    shard = write_code_shard(tmp_path / "p/00000.tar", items + pair_items(2))
    for ratio in (0.0, 1.0):
        pairs = PairSource(cfg("pairs", str(shard), t2i_ratio=ratio, caption_dropout=0.0, caption_field="recaption",
                               caption_field_prob=1.0), [shard], tok, max_len=64)
        assert len(list(pairs.stream(infinite=False))) == 2 and pairs.stats()["skipped"]["malformed"] == 2


def test_damaged_compressed_text_files_are_skipped(tok, tmp_path):
    """A truncated or corrupt .jsonl.gz (or .zst / .parquet) ends its file, counted as corrupt with file and
    line; the next file is read (the error stopped training, and a resume reached it again)."""
    raw = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300)).encode()
    cut = tmp_path / "a_cut.jsonl.gz"
    cut.write_bytes(gzip.compress(raw)[:-200])  # an interrupted download: EOFError
    html = tmp_path / "b_html.jsonl.gz"
    html.write_bytes(b"<html>404 Not Found</html>")  # an error page saved under the shard's name: BadGzipFile
    files = [cut, html]
    try:  # cut short: zstandard's own stream reader ended such a file silently
        import zstandard

        files.append(tmp_path / "c_cut.jsonl.zst")
        big = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(12000)).encode()  # > 1 block
        files[-1].write_bytes(zstandard.ZstdCompressor().compress(big)[:-200])
    except ImportError:
        pass
    for ext, pkg in (("jsonl.zst", "zstandard"), ("parquet", "pyarrow")):
        try:
            __import__(pkg)
        except ImportError:
            continue
        (tmp_path / f"c_html.{ext}").write_bytes(b"<html>404 Not Found</html>")
        files.append(tmp_path / f"c_html.{ext}")
    ok = write_jsonl(tmp_path / "d_ok.jsonl", [{"text": "last doc"}])
    src = TextSource(cfg("text", "x", shuffle=False), files + [ok], tok, max_len=64)
    texts = [tok.decode(s.input_ids[1:-1]) for s, _ in src.stream(infinite=False)]
    st = src.stats()
    starts = [i for i, t in enumerate(texts) if t == "doc 0"]  # where each damaged file's lines begin
    assert starts[0] == 0 and texts[1] == "doc 1" and texts[-1] == "last doc"
    from_gz = (starts[1:] or [len(texts) - 1])[0]
    assert 0 < from_gz < 300 and texts[:from_gz] == [f"doc {i}" for i in range(from_gz)]
    assert st["skipped"]["corrupt"] == len(files) and st["skipped"]["malformed"] == 0
    assert st["examples"]["corrupt"][:2] == [f"{cut}:{from_gz + 1}: EOFError: Compressed file ended before the "
                                             "end-of-stream marker was reached (rest of the file skipped)",
                                             f"{html}:1: BadGzipFile: Not a gzipped file (b'<h') (rest of the file "
                                             "skipped)"]
    if "zstandard" in sys.modules:  # the cut .zst gave its whole lines, then counted the cut
        from_zst = len(texts) - 1 - from_gz
        assert len(starts) == 2 and 0 < from_zst < 12000
        assert texts[from_gz:-1] == [f"doc {i}" for i in range(from_zst)]
        assert st["examples"]["corrupt"][2] == (f"{files[2]}:{from_zst + 1}: ZstdError: the file ends inside a zstd "
                                                "frame (truncated) (rest of the file skipped)")
    # a resume inside the damaged file reaches the damage again and goes on
    resumed = TextSource(cfg("text", "x", shuffle=False), files + [ok], tok, max_len=64)
    pos = next(p for i, (_, p) in enumerate(src.stream(infinite=False)) if i == 9)
    rest = [tok.decode(s.input_ids[1:-1]) for s, _ in resumed.stream(pos, infinite=False)]
    assert rest == texts[10:] and resumed.stats()["skipped"]["corrupt"] == len(files)


def test_text_resume_mid_document_and_offsets(tok, tmp_path):
    docs = [{"text": f"document {i} " + "words " * (i % 4 * 5)} for i in range(12)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    src = TextSource(cfg("text", str(f)), [f], tok, max_len=8)
    full = [(s.input_ids, p) for s, p in src.stream(infinite=False)]
    assert any(p.chunk > 0 for _, p in full)  # some documents were split into windows
    for cut in (3, 7, len(full) // 2):
        again = TextSource(cfg("text", str(f)), [f], tok, max_len=8)
        rest = [s.input_ids for s, _ in again.stream(full[cut - 1][1], infinite=False)]
        assert rest == [ids for ids, _ in full[cut:]]


def test_pair_reader_bad_data(tok, tmp_path):
    items = pair_items(4)
    items += [{"key": "nocodes", "txt": "caption only"},
              {"key": "garbage", "codes_bytes": b"not a numpy file", "txt": "x"},
              {"key": "badjson", "codes": codes_for(9), "txt": "y", "json": b"{nope"},
              {"key": "nocap", "codes": codes_for(8), "txt": "   "}]
    s0 = write_code_shard(tmp_path / "p/00000.tar", items)
    # two truncated shards (an interrupted copy): cut inside a member's data, and at a header boundary
    s1 = write_code_shard(tmp_path / "p/00001.tar", pair_items(6, start=10))
    s2 = write_code_shard(tmp_path / "p/00002.tar", pair_items(6, start=20))
    s1.write_bytes(s1.read_bytes()[:10240 + 512 + 60])
    s2.write_bytes(s2.read_bytes()[:10240 + 100])
    src = PairSource(cfg("pairs", str(s0), shuffle=False, t2i_ratio=1.0, caption_dropout=0.0), [s0, s1, s2], tok,
                     max_len=64)
    recs = list(src)
    keys = [r.key.split(":")[1] for r in recs]
    assert keys[:5] == ["img00000", "img00001", "img00002", "img00003", "nocap"]
    # what precedes the damage survives; the cut samples 13 and 23 keep only their codes.npy
    assert keys[5:] == [f"img{i:05d}" for i in (10, 11, 12, 13, 20, 21, 22, 23)]
    assert all(r.codes.shape == (K, H, W) for r in recs)
    np.testing.assert_array_equal(recs[1].codes, codes_for(1))
    assert recs[1].meta["path"] == "img/00001.jpg"
    st = src.stats()["skipped"]
    assert st["missing_image"] == 1 and st["malformed"] == 1 and st["corrupt"] == 3  # garbage member + 2 truncations
    samples = [s for s, _ in src.stream(infinite=False)]
    # nocap and the cut ones have no caption: as text-to-image they are null-prompt samples (the release's rule;
    # they were skipped as empty_text), as caption samples they are skipped
    assert src.stats()["skipped"]["empty_text"] == 0 and len(samples) == len(recs)
    assert src.stats()["null_prompt"] == 3 and all(s.image_gen == [True] for s in samples)
    assert sum(s.input_ids[:len(T.null_prompt_ids(tok))] == T.null_prompt_ids(tok) for s in samples) == 3
    captions = PairSource(cfg("pairs", str(s0), shuffle=False, t2i_ratio=0.0), [s0, s1, s2], tok, max_len=64)
    assert len(list(captions.stream(infinite=False))) == len(recs) - 3
    assert captions.stats()["skipped"]["empty_text"] == 3
    tight = PairSource(cfg("pairs", str(s0), t2i_ratio=1.0), [s0], tok, max_len=8)
    # the 4 captioned pairs and nocap's null prompt: the image alone leaves no room for a caption
    assert list(tight.stream(infinite=False)) == [] and tight.stats()["skipped"]["too_long"] == 5


def test_pair_captions_follow_the_release_rules(tok, tmp_path):
    """'no' marks an absent caption in `txt` too (it was trained as the prompt "no"); a caption too long for
    max_len is cut to fit, as the release cuts captions to 1750 tokens (the pair was skipped as too_long)."""
    long = " ".join(f"word{i}" for i in range(200))
    items = [{"key": "no", "codes": codes_for(0), "txt": "no", "json": {"recaption": "a red circle"}},
             {"key": "both_no", "codes": codes_for(1), "txt": "no", "json": {"recaption": "no"}},
             {"key": "long", "codes": codes_for(2), "txt": long}]
    shard = write_code_shard(tmp_path / "p/00000.tar", items)
    for ratio in (1.0, 0.0):
        src = PairSource(cfg("pairs", str(shard), shuffle=False, t2i_ratio=ratio, caption_dropout=0.0,
                             caption_field="recaption", caption_field_prob=0.0), [shard], tok, max_len=64)
        samples = [s for s, _ in src.stream(infinite=False)]
        st = src.stats()
        text = [tok.decode([i for i in s.input_ids if i >= 0 and i not in (1, 2, 3, 4)]) for s in samples]
        assert text[0].startswith("a red circle") and "no" not in text[0].split()
        assert st["truncated_caption"] == 1 and all(s.expanded_length() <= 64 for s in samples)
        assert text[-1].startswith("word0 word1") and 40 < samples[-1].expanded_length() <= 64
        if ratio == 1.0:  # both captions absent: the null prompt
            assert len(samples) == 3 and st["null_prompt"] == 1 and text[1] == "<unconditional>"
        else:
            assert len(samples) == 2 and st["skipped"]["empty_text"] == 1


def test_pair_t2i_ratio_dropout_and_caption_field(tok, tmp_path):
    shards = [write_code_shard(tmp_path / f"p/{i:05d}.tar", pair_items(50, start=50 * i)) for i in range(4)]
    src = PairSource(cfg("pairs", "x", t2i_ratio=0.3, caption_dropout=0.5, caption_field="recaption",
                         caption_field_prob=1.0), shards, tok, max_len=256)
    samples = [s for s, _ in src.stream(infinite=False)]
    st = src.stats()
    assert len(samples) == 200 and st["t2i"] + st["null_prompt"] + st["caption"] == 200
    assert abs((st["t2i"] + st["null_prompt"]) / 200 - 0.3) < 0.1
    assert abs(st["null_prompt"] / (st["t2i"] + st["null_prompt"]) - 0.5) < 0.2
    null_prefix = T.null_prompt_ids(tok)
    t2i = [s for s in samples if s.image_gen == [True] and s.input_ids[:len(null_prefix)] != null_prefix]
    # caption_field_prob=1: the recaption is always the caption
    assert t2i and all(tok.decode(s.input_ids[1:s.input_ids.index(3)]).startswith("recaption") for s in t2i)
    caps = [s for s in samples if s.image_gen == [False]]
    assert caps and all(tok.decode([i for i, lab in zip(s.input_ids, s.labels) if lab != -100],
                                   skip_special_tokens=True).startswith("recaption") for s in caps)
    always = T2ISource(cfg("t2i", "x", caption_dropout=0.0), shards[:1], tok)
    assert always.cfg.t2i_ratio == 1.0 and all(s.image_gen == [True] for s, _ in always.stream(infinite=False))


def test_instruction_reader_lookup_and_counters(tok, tmp_path):
    items = [{"key": f"k{i}", "codes": codes_for(i), "json": {"path": f"coco/{i}.png"}} for i in range(3)]
    shard = write_code_shard(tmp_path / "codes/00000.tar", items)
    rows = [{"id": "a", "image": "coco/0.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A circle."}]},
            {"id": "b", "image": "coco/1.jpg", "conversations": [  # .jpg in json, .png in shards: stem fallback
                {"from": "human", "value": "What color?\n<image>"}, {"from": "gpt", "value": "Red."}]},
            {"id": "c", "image": "coco/missing.jpg", "conversations": [
                {"from": "human", "value": "<image>\nHm?"}, {"from": "gpt", "value": "No."}]},
            {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"id": "e", "conversations": "not a list"},
            {"id": "f", "conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]},
            {"id": "g", "image": "coco/2.png", "conversations": [
                {"from": "human", "value": "<image>\n" + "Describe it in many words. " * 20},
                {"from": "gpt", "value": "Ok."}]}]
    j = tmp_path / "inst/train.json"
    j.parent.mkdir()
    j.write_text(json.dumps(rows))
    jl = write_jsonl(tmp_path / "inst/more.jsonl", rows[:1], raw_lines=["{broken json"])
    index_file = tmp_path / "index.json"
    c = cfg("instructions", str(j), shuffle=False, image_paths=[str(shard)], image_index=str(index_file))
    src = InstructionSource(c, [j, jl], tok, image_files=[shard], index_path=index_file, max_len=100)
    samples = [s for s, _ in src.stream(infinite=False)]
    st = src.stats()
    assert st["skipped"]["missing_image"] == 1 and st["skipped"]["too_long"] == 1
    assert st["skipped"]["malformed"] == 3  # "e" (record), "f" (conversation), broken JSONL line
    assert st["with_image"] == 3 and st["text_only"] == 1 and len(samples) == 4
    np.testing.assert_array_equal(samples[1].images[0], codes_for(1))
    assert index_file.is_file() and len(CodeIndex([shard], index_file)) == 3  # cached index reloads
    # another spelling of a packed path (pack_images keeps one member per normalized path)
    index = CodeIndex([shard], index_file)
    assert index.locate("./coco/0.png") == index.locate("coco//0.png") == index.locate("coco/0.png") is not None
    assert index.locate("./coco/1.jpg") == index.locate("coco/1.png") and index.locate("coco/9.png") is None


def test_one_unusable_shard_does_not_end_a_split_of_a_usable_source(tok, tmp_path):
    """Two pairs shards, one without codes (raw image tars), two splits: a split whose share of an epoch is the bad
    shard read nothing in that pass and raised, ending its rank, though the source is usable. Only a source whose
    every shard is unusable is refused."""
    import itertools

    good = write_code_shard(tmp_path / "p/00000.tar", pair_items(4))
    bad = write_code_shard(tmp_path / "p/00001.tar", [{"key": f"raw{i}", "txt": "a caption"} for i in range(4)])
    for split in (0, 1):
        src = PairSource(cfg("pairs", "x"), [good, bad], tok, max_len=64)
        assert len(list(itertools.islice(src.stream(split=split, num_splits=2), 20))) == 20
    src = PairSource(cfg("pairs", "x"), [bad, bad], tok, max_len=64)
    with pytest.raises(ValueError, match=r"no usable sample in \d+ pass\(es\) over 2 of its 2 files"):
        next(src.stream(split=0, num_splits=2))


def test_rank_splits_are_disjoint(tok, tmp_path):
    shards = [write_code_shard(tmp_path / f"p/{i:05d}.tar", pair_items(5, start=5 * i)) for i in range(4)]
    one = [write_code_shard(tmp_path / "q/00000.tar", pair_items(9))]
    for files in (shards, one):  # shard-level split, then record-level split (fewer shards than splits)
        keys = []
        for split in range(3):
            src = PairSource(cfg("pairs", "x"), files, tok)
            keys.append([r.key for r, *_ in src.records(split=split, num_splits=3)])
        flat = sum(keys, [])
        assert len(flat) == len(set(flat)) == 5 * len(files) if files is shards else len(flat) == 9
        assert all(keys)


def test_whole_file_errors_count_once_over_splits(tok, tmp_path):
    """With fewer files than splits every split reads each file; its damage is counted by one split only,
    so the counters merged over ranks and workers say one damaged file, not one per reader."""
    tar = write_code_shard(tmp_path / "p/00000.tar", pair_items(8))
    tar.write_bytes(tar.read_bytes()[:-10240])  # lost its tail
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)).encode())[:-30])
    listing = tmp_path / "broken.json"
    listing.write_text('[{"id": "a", "conversations": [')
    for cls, kind, f in ((PairSource, "pairs", tar), (TextSource, "text", gz),
                         (InstructionSource, "instructions", listing)):
        reason, n = "malformed" if kind == "instructions" else "corrupt", 0
        for split in range(4):  # e.g. 2 ranks x 2 workers over one file
            src = cls(cfg(kind, str(f)), [f], tok, max_len=64)
            list(src.stream(split=split, num_splits=4, infinite=False))
            n += src.stats()["skipped"][reason]
        assert n == 1, kind
    # the code shards an instruction source indexes: each reader builds the index (no image_index cache)
    conv = write_jsonl(tmp_path / "conv.jsonl", [{"image": "img/00000.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}]}] * 4)  # one per split
    good = write_code_shard(tmp_path / "c/00000.tar", pair_items(1))
    bad = tmp_path / "c/00001.tar"
    bad.write_bytes(b"<html>404 Not Found</html>")
    n, read = 0, 0
    for split in range(4):
        src = InstructionSource(cfg("instructions", str(conv)), [conv], tok, image_files=[good, bad], max_len=256)
        list(src.stream(split=split, num_splits=4, infinite=False))
        n, read = n + src.stats()["skipped"]["corrupt"], read + src.stats().get("with_image", 0)
    assert n == 1 and read == 4, src.stats()


# ---- mixture loader ---------------------------------------------------------------------------------------
@pytest.fixture
def mix_recipe(tmp_path):
    """Text (short docs) + pairs + instructions over several shards."""
    for f in range(3):
        write_jsonl(tmp_path / f"text/{f}.jsonl", [{"text": f"doc {f} {i} " + "word " * (i % 7)} for i in range(40)])
    for s in range(4):
        write_code_shard(tmp_path / f"codes/{s:05d}.tar", pair_items(25, start=25 * s))
    rows = [{"id": str(i), "image": f"img/{i:05d}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"Number {i}."}]}
        for i in range(60)]
    (tmp_path / "inst.json").write_text(json.dumps(rows))

    def make(weights=(3, 1, 1), budgets=None):
        kinds = [("text", "text", {"paths": "text/{0..2}.jsonl"}),
                 ("pairs", "pairs", {"paths": "codes/{00000..00003}.tar", "caption_field": "recaption"}),
                 ("chat", "instructions", {"paths": "inst.json", "image_paths": "codes/{00000..00003}.tar"})]
        srcs = []
        for i, (name, kind, extra) in enumerate(kinds):
            d = {"name": name, "kind": kind, **extra}
            if budgets:
                d["budget"] = budgets[i]
            else:
                d["weight"] = weights[i]
            srcs.append(d)
        return Recipe.from_dict({"name": "mix", "root": str(tmp_path), "sources": srcs})
    return make


def take(it, n):
    return [next(it) for _ in range(n)]


def test_mixture_proportions_and_determinism(tok, mix_recipe):
    L = MixtureLoader(mix_recipe((3, 1, 1)), tok, micro_batch_size=4, max_len=128, seed=3)
    batches = take(iter(L), 150)
    st = L.stats()
    n = {k: v["samples"] for k, v in st["sources"].items()}
    total = sum(n.values())
    assert total == sum(int(b["num_samples"]) for b in batches) > 1000
    for name, w in (("text", 0.6), ("pairs", 0.2), ("chat", 0.2)):
        assert abs(n[name] / total - w) < 0.04, (n, total)
    assert st["batches"] == 150 and 0 <= st["pad_ratio"] < 1 and "pairs: samples=" in format_stats(st)
    again = take(iter(MixtureLoader(mix_recipe((3, 1, 1)), tok, micro_batch_size=4, max_len=128, seed=3)), 20)
    assert all(tensors_equal(a, b) for a, b in zip(batches[:20], again))
    other = take(iter(MixtureLoader(mix_recipe((3, 1, 1)), tok, micro_batch_size=4, max_len=128, seed=4)), 20)
    assert not all(tensors_equal(a, b) for a, b in zip(batches[:20], other))


def test_budgets_exact_in_finite_mode(tok, mix_recipe):
    L = MixtureLoader(mix_recipe(budgets=(30, 50, 20)), tok, micro_batch_size=2, max_len=128, infinite=False)
    batches = list(L)
    n = {k: v["samples"] for k, v in L.stats()["sources"].items()}
    assert n == {"text": 30, "pairs": 50, "chat": 20}  # pairs (100 records) and chat cycle as needed
    assert sum(int(b["num_samples"]) for b in batches) == 100


def test_packing_rows_and_pad_ratio(tok, mix_recipe):
    packed = MixtureLoader(mix_recipe(), tok, micro_batch_size=3, max_len=160, seed=0)
    padded = MixtureLoader(mix_recipe(), tok, micro_batch_size=3, max_len=160, seed=0, pack=False)
    for b in take(iter(packed), 20):
        assert b["input_ids"].shape == (3, 160) and b["attention_mask"] is None
        assert int(b["num_samples"]) > 3
        assert ((b["labels"] != -100).sum(1) > 0).all()
    for b in take(iter(padded), 20):
        assert b["input_ids"].shape[0] == 3 and int(b["num_samples"]) == 3
    assert packed.stats()["pad_ratio"] < padded.stats()["pad_ratio"]


def test_packed_samples_are_not_targets_of_each_other(tok):
    """The loss pairs position t with label t + 1: packed, a sample's first label would be the target of
    the previous sample's last token. It is -100, so the packed targets are exactly the unpacked ones."""
    windows = T.text_samples(tok, "The quick brown fox jumps over the lazy dog. " * 4, max_len=16)
    chat = T.conversation_sample(tok, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])
    samples = [windows[0], windows[1], chat, windows[2]]
    assert windows[1].labels[0] != -100  # a mid-document token: the previous window must not predict it
    packed = collate(samples, pack_to=256)
    assert packed["input_ids"].shape[0] == 1
    starts = np.cumsum([0] + [len(s.input_ids) for s in samples])[:-1].tolist()
    assert packed["position_ids"][0, starts].tolist() == [0] * len(samples)
    assert packed["labels"][0, starts].tolist() == [-100] * len(samples)
    # targets of the shifted loss: (predicting position, label), packed vs each sample alone
    pairs = [(t, int(lab)) for t, lab in enumerate(packed["labels"][0, 1:]) if lab != -100]
    alone = [(start + t, lab) for s, start in zip(samples, starts) for t, lab in enumerate(s.labels[1:]) if lab != -100]
    assert pairs == alone
    # unpacked rows: labels as templated but the first (at the row's start it is never a target either way)
    padded = collate(samples)
    for b, s in enumerate(samples):
        assert padded["labels"][b, :len(s.labels)].tolist() == [-100] + s.labels[1:]


def test_resume_refuses_a_changed_file_list(tok, tmp_path, caplog):
    """A Position indexes the file list: a glob that matches other files on resume is refused (it replayed
    seen data and skipped unseen data silently); moving the whole data tree is fine."""
    for f in range(3):
        write_jsonl(tmp_path / f"data/dclm/{f:02d}.jsonl", [{"text": f"file {f} doc {i}"} for i in range(6)])
    write_jsonl(tmp_path / "data/other.jsonl", [{"text": f"other doc {i}"} for i in range(6)])

    def recipe(root):
        return Recipe.from_dict({"name": "r", "root": str(root), "sources": [
            {"name": "dclm", "kind": "text", "paths": "dclm/*.jsonl", "weight": 1},
            {"name": "other", "kind": "text", "paths": "other.jsonl", "weight": 1}]})
    kw = dict(micro_batch_size=1, max_len=32, pack=False)
    ref = MixtureLoader(recipe(tmp_path / "data"), tok, **kw)
    it = iter(ref)
    take(it, 3)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = take(it, 3)
    (tmp_path / "data").rename(tmp_path / "moved")  # a new mount point: the same files, resume is exact
    moved = MixtureLoader(recipe(tmp_path / "moved"), tok, **kw)
    moved.load_state_dict(state)
    assert all(tensors_equal(a, b) for a, b in zip(expected, take(iter(moved), 3)))
    write_jsonl(tmp_path / "moved/dclm/03.jsonl", [{"text": "new file"}])  # the glob matches one more file
    with pytest.raises(ValueError, match=r"source 'dclm' .* 3 files then, 4 now \(\+1\).*--init-from"):
        MixtureLoader(recipe(tmp_path / "moved"), tok, **kw).load_state_dict(state)
    (tmp_path / "moved/dclm/03.jsonl").unlink()
    (tmp_path / "moved/dclm/00.jsonl").rename(tmp_path / "moved/dclm/99.jsonl")  # same count, another order
    with pytest.raises(ValueError, match="source 'dclm' .* same number of files \\(3\\)"):
        MixtureLoader(recipe(tmp_path / "moved"), tok, **kw).load_state_dict(state)
    # a state from before file lists were recorded loads, with a warning
    old = {k: v for k, v in state.items() if k != "source_files"}
    with caplog.at_level("WARNING"):
        MixtureLoader(recipe(tmp_path / "moved"), tok, **kw).load_state_dict(old)
    assert "does not record the sources' file lists" in caplog.text


@pytest.mark.parametrize("pack,num_workers", [(True, 0), (False, 0), (True, 2)])
def test_resume_continues_the_stream_exactly(tok, mix_recipe, pack, num_workers):
    kw = dict(micro_batch_size=3, max_len=160, seed=7, pack=pack, num_workers=num_workers, rank=1, world_size=2)
    ref = MixtureLoader(mix_recipe(), tok, **kw)
    it = iter(ref)
    take(it, 7)
    state = json.loads(json.dumps(ref.state_dict()))  # JSON-able
    expected = take(it, 6)
    stats_before = None
    restored = MixtureLoader(mix_recipe(), tok, **kw)
    restored.load_state_dict(state)
    stats_before = restored.stats()
    got = take(iter(restored), 6)
    assert all(tensors_equal(a, b) for a, b in zip(expected, got))
    assert stats_before["batches"] == 7 and restored.stats() == ref.stats()
    with pytest.raises(ValueError, match="seed"):
        MixtureLoader(mix_recipe(), tok, **dict(kw, seed=8)).load_state_dict(state)


def _lookahead_recipe(tmp_path) -> Recipe:
    """Two text sources of unique documents "d<source>x<i> word ..." of 4 to ~90 tokens (rows of 96 fill badly
    without look-ahead)."""
    for src in range(2):
        write_jsonl(tmp_path / f"la/{src}.jsonl",
                    [{"text": f"d{src}x{i} " + "word " * ((7 * i + 3 * src) % 29)} for i in range(60)])
    return Recipe.from_dict({"name": "la", "root": str(tmp_path), "sources": [
        {"name": f"s{src}", "kind": "text", "paths": f"la/{src}.jsonl", "weight": 1 + src} for src in range(2)]})


def _doc_ids(tok, batch) -> list[str]:
    """The documents of a packed text batch, one per sample: each sample's position ids restart at 0."""
    out = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            text = tok.decode(ids[a:b], skip_special_tokens=True).strip()
            if text:  # (the trailing padding is a segment of its own)
                out.append(text.split()[0])
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lookahead_holds_samples_and_loses_none_across_a_resume(tok, tmp_path, num_workers):
    """pack_lookahead holds samples that fit no row of a full batch and keeps drawing to fill the rows. Over a
    finite epoch every document is in exactly one batch, also when the loader is rebuilt from a state taken
    while several samples were held (the state replays their draws); the held ones are not yet counted."""
    recipe = _lookahead_recipe(tmp_path)
    every = sorted(f"d{s}x{i}" for s in range(2) for i in range(60))
    kw = dict(micro_batch_size=2, max_len=96, num_workers=num_workers, infinite=False, seed=1)
    ref = MixtureLoader(recipe, tok, **kw)
    batches, state, cut = [], None, None
    for b in ref:
        batches.append(b)
        st = ref.state_dict()
        held = [len(w["pending"]) for w in st["workers"].values()]
        if state is None and len(batches) >= 3 and max(held) >= 2:
            state, cut = json.loads(json.dumps(st)), len(batches)
            seen = sum(s["samples"] for s in ref.stats()["sources"].values())
            assert seen == sum(int(x["num_samples"]) for x in batches)  # the held samples are not counted yet
    assert state is not None, "no batch ended with two samples held"
    docs = [d for b in batches for d in _doc_ids(tok, b)]
    assert sorted(docs) == every  # none lost, none twice, the held ones at the end included
    restored = MixtureLoader(recipe, tok, **kw)
    restored.load_state_dict(state)
    rest = list(restored)
    assert len(rest) == len(batches) - cut and all(tensors_equal(a, b) for a, b in zip(batches[cut:], rest))
    assert restored.stats() == ref.stats()
    plain = MixtureLoader(recipe, tok, **dict(kw, pack_lookahead=1))  # the batch closes at the first misfit
    assert sorted(d for b in plain for d in _doc_ids(tok, b)) == every
    assert ref.stats()["pad_ratio"] < plain.stats()["pad_ratio"] - 0.03, (ref.stats(), plain.stats())
    with pytest.raises(ValueError, match="pack_lookahead=8, this loader has 1"):
        MixtureLoader(recipe, tok, **dict(kw, pack_lookahead=1)).load_state_dict(state)


def test_loader_state_versions(tok, mix_recipe, caplog):
    """A version-1 state (nothing held: the sample a batch closed on is redrawn) resumes at its data position; an
    unknown version says what to do."""
    kw = dict(micro_batch_size=2, max_len=160, pack=False)
    ref = MixtureLoader(mix_recipe(), tok, **kw)
    it = iter(ref)
    take(it, 4)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = take(it, 4)
    assert state["version"] == 2
    v1 = {k: v for k, v in state.items() if k != "pack_lookahead"}
    v1["version"] = 1
    v1["workers"] = {k: {f: x for f, x in w.items() if f not in ("replay", "pending")}
                     for k, w in v1["workers"].items()}
    old = MixtureLoader(mix_recipe(), tok, **kw)
    with caplog.at_level("WARNING"):
        old.load_state_dict(v1)
    assert "version 1" in caplog.text
    assert all(tensors_equal(a, b) for a, b in zip(expected, take(iter(old), 4)))
    with pytest.raises(ValueError, match=r"version 3 \(this code reads versions 1 and 2\).*--init-from"):
        MixtureLoader(mix_recipe(), tok, **kw).load_state_dict(dict(state, version=3))


def test_a_resume_while_samples_are_held_at_the_end_counts_each_skip_once(tok, tmp_path):
    """Finite mode: the draw that finds the end reads (and counts) a source's trailing bad records while samples
    are still held; a state saved then predates that draw, and a restored loader counted them twice."""
    docs = [{"text": f"d{i} " + "word " * ((7 * i) % 29)} for i in range(30)] + [{"text": "x " * 300}]  # too long
    write_jsonl(tmp_path / "a.jsonl", docs)
    recipe = Recipe.from_dict({"name": "r", "root": str(tmp_path), "sources": [
        {"name": "a", "kind": "text", "paths": "a.jsonl", "weight": 1, "text_overflow": "skip", "shuffle": False}]})
    kw = dict(micro_batch_size=1, max_len=96, infinite=False)
    ref, seen = MixtureLoader(recipe, tok, **kw), []
    for batch in ref:
        seen.append((batch, json.loads(json.dumps(ref.state_dict()))))
    end = ref.stats()["sources"]["a"]
    assert (end["records"], end["skipped"]["too_long"]) == (31, 1)
    cut = max(k for k, (_, st) in enumerate(seen) if st["workers"]["0"]["pending"])  # after the end was found
    resumed = MixtureLoader(recipe, tok, **kw)
    resumed.load_state_dict(seen[cut][1])
    rest = list(resumed)
    assert len(rest) == len(seen) - cut - 1 and all(tensors_equal(a, b) for a, (b, _) in zip(rest, seen[cut + 1:]))
    s = resumed.stats()["sources"]["a"]
    assert (s["records"], s["skipped"]["too_long"]) == (31, 1)  # was (32, 2)


def test_ranks_read_different_data(tok, mix_recipe):
    a = take(iter(MixtureLoader(mix_recipe(), tok, micro_batch_size=2, max_len=160, rank=0, world_size=2)), 5)
    b = take(iter(MixtureLoader(mix_recipe(), tok, micro_batch_size=2, max_len=160, rank=1, world_size=2)), 5)
    assert not any(tensors_equal(x, y) for x, y in zip(a, b))


def test_loader_counts_bad_data(tok, tmp_path):
    write_code_shard(tmp_path / "c/00000.tar", pair_items(10) + [{"key": "zz", "codes_bytes": b"junk", "txt": "t"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": ""}, {"text": "long " * 200}], raw_lines=["{x"])
    r = Recipe.from_dict({"name": "bad", "root": str(tmp_path), "sources": [
        {"name": "t", "kind": "text", "paths": "t.jsonl", "weight": 1, "text_overflow": "skip"},
        {"name": "p", "kind": "pairs", "paths": "c/00000.tar", "weight": 1}]})
    L = MixtureLoader(r, tok, micro_batch_size=2, max_len=64, infinite=False)
    assert sum(int(b["num_samples"]) for b in L) == 11
    st = L.stats()["sources"]
    assert st["t"]["skipped"] == {"missing_image": 0, "malformed": 1, "empty_text": 1, "too_long": 1, "corrupt": 0}
    assert st["p"]["skipped"]["corrupt"] == 1 and st["p"]["samples"] == 10


def test_truncated_documents_are_counted(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "word " * 50}, {"text": "word " * 9}])
    src = TextSource(cfg("text", str(f), shuffle=False, text_overflow="truncate"), [f], tok, max_len=8)
    assert [len(s.input_ids) for s, _ in src.stream(infinite=False)][1:] == [8, 8]
    assert src.stats()["truncated"] == 2  # the tails of two documents were dropped, uncounted before


def test_left_padding_does_not_train_a_pad_to_predict_the_first_token(tok):
    """With padding_side='left' the first label of the shorter row sat after a pad, which was trained to predict
    it (34 targets against 33 unpadded)."""
    a, b = T.text_samples(tok, "a short one"), T.text_samples(tok, "a much longer document than the other one")
    both, alone_a, alone_b = (int((collate(s, padding_side="left")["labels"][:, 1:] != -100).sum())
                              for s in (a + b, a, b))
    assert both == alone_a + alone_b


def test_codes_the_model_cannot_embed_are_skipped_as_corrupt(tok, tmp_path):
    """A shard of another tokenizer (more codes, or other sub-code count) without a manifest crashed the forward
    with a bare IndexError (a device-side assert on a GPU)."""
    big = codes_for(0).astype(np.uint16)
    big[0, 0, 0] = 4096
    items = pair_items(2) + [{"key": "big", "codes": big, "txt": "x"},
                             {"key": "k3", "codes": codes_for(1)[:3], "txt": "y"}]
    shard = write_code_shard(tmp_path / "p/00000.tar", items)
    src = PairSource(cfg("pairs", str(shard), shuffle=False), [shard], tok, max_len=256, codebooks=(K, 4096))
    assert [r.key.split(":")[1] for r in src] == ["img00000", "img00001"]
    assert src.stats()["skipped"]["corrupt"] == 2
    assert any("the model's codebooks hold 4096 codes" in e for e in src.stats()["examples"]["corrupt"])
    assert any(f"3 sub-codes per position, the model {K}" in e for e in src.stats()["examples"]["corrupt"])
    assert len(list(PairSource(cfg("pairs", str(shard)), [shard], tok, max_len=256))) == 4  # unchecked without it


def test_a_conversation_too_long_keeps_its_leading_rounds(tok, tmp_path):
    """A 40-turn conversation over max_len was dropped whole as too_long, with all 20 answers."""
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": ("<image>\n" if i == 0 else "") + f"turn {i} " * 6}
             for i in range(40)]
    short = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "image": "a.jpg", "conversations": turns},
                                           {"id": "huge", "conversations": [{"from": "human", "value": "q " * 300},
                                                                            {"from": "gpt", "value": "a"}]},
                                           {"id": "short", "image": "a.jpg", "conversations": short}])
    codes = write_code_shard(tmp_path / "codes/00000.tar", [{"key": "a", "codes": codes_for(0), "txt": "",
                                                             "json": {"path": "a.jpg"}}])
    src = InstructionSource(cfg("instructions", str(f), shuffle=False), [f], tok, max_len=200, image_files=[codes])
    samples = [s for s, _ in src.stream(infinite=False)]
    st = src.stats()
    assert len(samples) == 2 and st["truncated_conversation"] == 1 and st["skipped"]["too_long"] == 1
    kept = samples[0]
    assert 150 < kept.expanded_length() <= 200 and kept.input_ids[-1] == tok.eos_token_id  # ends on a whole answer
    assert IMAGE_TOKEN_INDEX in kept.input_ids and len(kept.images) == 1
    whole = T.conversation_sample(tok, turns, [codes_for(0)])
    assert kept.input_ids == whole.input_ids[:len(kept.input_ids)]  # a prefix of the whole conversation
