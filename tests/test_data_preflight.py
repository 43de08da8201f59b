"""Recipes on the public releases' real file names, text readers for every suffix, and the data checks
that run before a training run builds its model (mllm.data.preflight)."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm.data.loader import MixtureLoader, format_stats, merge_stats
from mllm.data.preflight import preflight, probe
from mllm.data.recipe import Recipe, SourceConfig, load_recipe
from mllm.data.sources import TextSource
from mllm.data.tiny_tokenizer import load_llama_tokenizer, make_llama_tokenizer
from public_text import DCLM_FILES, write_dclm
from runtime.launch import ROOT, ds_env, free_port
from test_mllm_data import codes_for, pair_items, write_code_shard


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_llama_tokenizer(make_llama_tokenizer(tmp_path_factory.mktemp("llama_tok")))


def text_source(files, **kw) -> TextSource:
    return TextSource(SourceConfig(name="dclm", kind="text", paths=["x"], weight=1.0, **kw), files)


# ---- DCLM as released ------------------------------------------------------------------------------------
def test_dclm_release_files_read_with_full_schema_and_null_text(tmp_path):
    files = write_dclm(tmp_path / "dclm", docs_per_file=10, null_every=5)
    recipe = Recipe("r", [SourceConfig(name="dclm", kind="text", paths=["dclm/**/*.jsonl.zst*"], weight=1.0)],
                    root=str(tmp_path))
    got = recipe.files(recipe.sources[0])
    assert got == sorted(tmp_path / "dclm" / f for f in DCLM_FILES) == files  # sorted, gaps and all
    src = text_source(got)
    texts = [r.text for r in src]
    st = src.stats()
    assert len(texts) == 24 and st["records"] == 24
    assert st["skipped"]["empty_text"] == 6 and st["skipped"]["malformed"] == 0  # 30 rows, every 5th null
    assert st["examples"]["empty_text"][0].startswith("shard_00000000_processed.jsonl.zst:5")


def test_every_text_suffix_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [{"text": f"document number {i}", "url": f"u{i}"} for i in range(5)]
    raw = "".join(json.dumps(d) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    for suffix in (".jsonl.zst", ".jsonl.zstd"):
        (tmp_path / f"c{suffix}").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": [d["text"] for d in docs], "url": [d["url"] for d in docs]}),
                   tmp_path / "d.parquet")
    names = ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "c.jsonl.zstd", "d.parquet"]
    for name in names:
        assert [r.text for r in text_source([tmp_path / name])] == [d["text"] for d in docs], name
    (tmp_path / "e.txt").write_text("plain text")
    with pytest.raises(ValueError, match=r"unsupported text file .*e\.txt"):
        text_source([tmp_path / "e.txt"])


# ---- recipes: real names, globs, brace ranges ---------------------------------------------------------------
def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_shipped_recipes_resolve_the_release_layouts(tmp_path):
    write_dclm(tmp_path / "dclm")
    _touch(tmp_path / "dclm/global-shard_02_of_10/local-shard_0_of_10/shard_00000000_processed.jsonl.zst")
    s3 = _touch(tmp_path / "dclm/global-shard_01_of_10/local-shard_2_of_10/shard_00000005_processed.jsonl.zstd")
    for d in ("midjourney", "coyo", "laion", "t2i_finetune", "mgm"):
        for i in (0, 1, 3):  # a gap in the shard range
            _touch(tmp_path / d / "codes" / f"{i:05d}.tar")
    _touch(tmp_path / "mgm/instructions/00000.jsonl")
    s1 = load_recipe(ROOT / "data_recipes/stage1_pretrain.yaml", root=tmp_path)
    dclm = s1.files(s1.sources[0])
    assert dclm == sorted([*(tmp_path / "dclm" / f for f in DCLM_FILES), s3])  # global-shard_01 only, hub and S3 names
    assert [p.name for p in s1.files(s1.sources[2])] == ["00000.tar", "00001.tar", "00003.tar"] * 2
    assert sum(s.budget for s in s1.sources if s.kind == "text") == 10_000_000
    assert sum(s.budget for s in s1.sources if s.kind == "pairs") == 60_000_000
    s2 = load_recipe(ROOT / "data_recipes/stage2_finetune.yaml", root=tmp_path)
    assert {s.kind: s.budget for s in s2.sources} == {"t2i": 1_500_000, "instructions": 1_500_000}
    assert s2.image_index(s2.sources[1]) == tmp_path / "mgm/codes/index.json"
    for f in ("demo.yaml", "demo_finetune.yaml"):
        r = load_recipe(ROOT / "data_recipes" / f, check_paths=False)
        assert r.files(r.sources[0])


def test_glob_and_brace_forms(tmp_path):
    for name in ("b/2.tar", "a/10.tar", "a/9.tar"):
        _touch(tmp_path / name)
    r = Recipe("r", [SourceConfig(name="s", kind="pairs", paths=["**/*.tar"], weight=1.0)], root=str(tmp_path))
    assert [str(p.relative_to(tmp_path)) for p in r.files(r.sources[0])] == ["a/10.tar", "a/9.tar", "b/2.tar"]
    r = Recipe("r", [SourceConfig(name="s", kind="pairs", paths=["a/{9..10}.tar"], weight=1.0)], root=str(tmp_path))
    assert [p.name for p in r.files(r.sources[0])] == ["9.tar", "10.tar"]
    r = Recipe("r", [SourceConfig(name="s", kind="pairs", paths=["c/*.tar"], weight=1.0)], root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"source 's': pattern .*c/\*\.tar matches no file"):
        r.check_paths()
    r = Recipe("r", [SourceConfig(name="s", kind="pairs", paths=["a/{8..10}.tar"], weight=1.0)], root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"source 's': missing .*a/8\.tar"):
        r.check_paths()


# ---- preflight ------------------------------------------------------------------------------------------------
def _mgm(root: Path, with_path: bool = True, size: int | None = 32) -> Recipe:
    items = [{**it, "json": {"path": f"coco/{it['key']}.jpg"} if with_path else {}} for it in pair_items(3)]
    write_code_shard(root / "mgm/codes/00000.tar", items)
    if size is not None:
        (root / "mgm/codes/manifest.json").write_text(json.dumps({"image_size": size, "grid": [size // 16] * 2}))
    conv = {"id": 1, "image": "coco/img00000.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    _touch(root / "mgm/instructions/00000.jsonl", (json.dumps(conv) + "\n").encode())
    return Recipe("ft", [SourceConfig(name="mgm", kind="instructions", paths=["mgm/instructions/*.jsonl"],
                                      image_paths=["mgm/codes/*.tar"], image_index="mgm/codes/index.json",
                                      weight=1.0)], root=str(root))


def test_image_index_resolves_against_the_recipe_root(tmp_path, monkeypatch, tok):
    recipe = _mgm(tmp_path / "data")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = preflight(recipe, expect_image_size=32)
    index = tmp_path / "data/mgm/codes/index.json"
    assert index.is_file() and not list(elsewhere.iterdir())
    assert report.index_entries == {"mgm": 3} and report.image_size == 32
    assert not list(index.parent.glob("*.tmp-*"))  # written atomically
    loader = MixtureLoader(recipe, tok, micro_batch_size=1, max_len=256)
    batch = next(iter(loader))
    n = batch["image_codes"].shape[0]  # the one conversation, cycled and packed
    assert n >= 1 and loader.stats()["sources"]["mgm"]["with_image"] == n
    assert (batch["image_codes"][0].reshape(-1) == torch.as_tensor(codes_for(0).astype("int64")).reshape(-1)).all()


def test_preflight_names_file_and_source(tmp_path):
    root = tmp_path / "data"
    recipe = _mgm(root)
    recipe.sources[0].image_index = "nowhere/index.json"
    with pytest.raises(FileNotFoundError, match=r"source 'mgm'.*nowhere/index\.json does not exist"):
        preflight(recipe)
    (root / "mgm/codes/00000.tar").unlink()
    recipe = _mgm(root, with_path=False)
    with pytest.raises(ValueError, match=r"source 'mgm'.*00000\.tar.*json `path`"):
        preflight(recipe)
    recipe = _mgm(root, size=32)
    with pytest.raises(ValueError, match=r"extracted at 32 px .*manifest\.json.* model was trained at 64 px"):
        preflight(recipe, expect_image_size=64)
    write_code_shard(root / "other/codes/00000.tar", pair_items(2))
    (root / "other/codes/manifest.json").write_text(json.dumps({"config": {"size": 64}}))
    mixed = Recipe("r", [*recipe.sources, SourceConfig(name="pairs", kind="pairs", paths=["other/codes/*.tar"],
                                                        weight=1.0)], root=str(root))
    with pytest.raises(ValueError, match=r"different image sizes: 32 px .*64 px"):
        preflight(mixed)
    # one size, two tokenizers (a retrained tokenizer's codes next to the old one's)
    for folder, fingerprint in (("mgm", "a" * 16), ("other", "b" * 16)):
        (root / folder / "codes/manifest.json").write_text(json.dumps({"image_size": 32,
                                                                        "tokenizer_fingerprint": fingerprint}))
    with pytest.raises(ValueError, match=r"different tokenizers: a{16} \(.*mgm/codes/manifest.json\), b{16} "):
        preflight(mixed)
    assert preflight(recipe).tokenizer_fingerprint == "a" * 16
    _touch(root / "odd/00000.parquet")
    bad = Recipe("r", [SourceConfig(name="odd", kind="pairs", paths=["odd/*.parquet"], weight=1.0)], root=str(root))
    with pytest.raises(ValueError, match=r"source 'odd'.*00000\.parquet is not a code shard"):
        preflight(bad)
    _touch(root / "txt/a.jsonl", b"")
    _touch(root / "txt/b.jsonl", b"")
    empty = Recipe("r", [SourceConfig(name="web", kind="text", paths=["txt/*.jsonl"], weight=1.0)], root=str(root))
    with pytest.raises(ValueError, match=r"source 'web': all 2 files are empty"):
        preflight(empty)
    _touch(root / "txt/c.txt")
    unknown = Recipe("r", [SourceConfig(name="web", kind="text", paths=["txt/c.txt"], weight=1.0)], root=str(root))
    with pytest.raises(ValueError, match=r"unsupported text file .*c\.txt"):
        preflight(unknown)
    # text-only conversations (no image_paths, as the README allows): passed, with a warning (refused before)
    _touch(root / "chat/00000.jsonl", b'{"conversations": []}\n')
    chat = Recipe("r", [SourceConfig(name="chat", kind="instructions", paths=["chat/*.jsonl"], weight=1.0)],
                  root=str(root))
    assert preflight(chat).files == {"chat": 1}


def test_probe_refuses_a_source_whose_records_give_no_sample(tmp_path, tok, caplog):
    """Each of these passed preflight and failed in the run's loader only after a whole pass over every file of
    the source, after the model was built."""
    root = tmp_path / "data"
    # a `text_field` the files do not have: 5000 documents, of which the probe reads 64 per file
    for i in range(5):
        _touch(root / f"web/{i:05d}.jsonl", "".join(json.dumps({"content": f"doc {i} {n}"}) + "\n"
                                                     for n in range(1000)).encode())
    web = Recipe("r", [SourceConfig(name="web", kind="text", paths=["web/*.jsonl"], weight=1.0)], root=str(root))
    preflight(web)
    with pytest.raises(ValueError, match=r"source 'web': the first 64 records of .*00000\.jsonl, .*00002\.jsonl, "
                                         r".*00004\.jsonl: none of 192 gives a training sample \(max_len 256\): "
                                         r"malformed 192 \(e\.g\. 00000\.jsonl:1: no field 'text'"):
        probe(web, tok, 256)
    # conversations whose image paths are not the code shards' (another folder prefix)
    recipe = _mgm(root)
    path = root / "mgm/instructions/00000.jsonl"
    path.write_text(path.read_text().replace("coco/img00000.jpg", "train2017/img00000.jpg"))
    preflight(recipe)
    with pytest.raises(ValueError, match=r"source 'mgm'.*none of 1 gives.*missing_image 1 \(e\.g\. 00000\.jsonl:1 "
                                         r"id=1: no codes for image 'train2017/img00000\.jpg'"):
        probe(recipe, tok, 256)
    # max_len below one image's positions
    write_code_shard(root / "pairs/00000.tar", pair_items(4))
    pairs = Recipe("r", [SourceConfig(name="pairs", kind="pairs", paths=["pairs/*.tar"], weight=1.0)],
                   root=str(root))
    with pytest.raises(ValueError, match=r"source 'pairs'.*none of 4 gives a training sample \(max_len 4\): "
                                         r"too_long 4"):
        probe(pairs, tok, 4)
    assert probe(pairs, tok, 256) == {"pairs": (4, 4)}
    # mostly bad: passes with a warning that names the reasons
    good = [json.dumps({"text": f"a document {n}"}) for n in range(10)]
    _touch(root / "mixed/00000.jsonl", "\n".join(good + ["{not json"] * 90).encode())
    mixed = Recipe("r", [SourceConfig(name="mixed", kind="text", paths=["mixed/*.jsonl"], weight=1.0)],
                   root=str(root))
    with caplog.at_level("WARNING"):
        assert probe(mixed, tok, 256) == {"mixed": (64, 10)}
    assert "only 10 of 64 give a training sample: malformed 54" in caplog.text


@pytest.mark.slow
def test_trainer_rejects_bad_data_before_building_the_model(tmp_path):
    root = tmp_path / "data"
    _touch(root / "web/00000.txt")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"name: bad\nroot: {root}\nsources:\n  - name: web\n    kind: text\n"
                      "    paths: web/*.txt\n    weight: 1\n")
    llama = tmp_path / "llama"
    _touch(llama / "config.json", b"{}")  # never read: the data check comes first
    _touch(llama / "model.safetensors")  # (that the folder holds weights is checked with the flags)
    tokenizer = _touch(tmp_path / "tok.pth")
    env = {**ds_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    p = subprocess.run([sys.executable, "-m", "mllm.train", "--llama-dir", str(llama), "--tokenizer", str(tokenizer),
                        "--recipe", str(recipe), "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "source 'web': unsupported text file" in p.stderr and "00000.txt" in p.stderr
    log = (tmp_path / "run/log.txt").read_text() if (tmp_path / "run/log.txt").exists() else ""
    assert "initialised from" not in log and "parameter elements" not in log
    # a budget below world_size x num_workers: refused before the model too (it was refused by the loader, made
    # after the model and DeepSpeed)
    _touch(root / "web/00000.jsonl", b'{"text": "a document"}\n')
    recipe.write_text(f"name: small\nroot: {root}\nsources:\n  - name: web\n    kind: text\n"
                      "    paths: web/*.jsonl\n    budget: 1\n")
    p = subprocess.run([sys.executable, "-m", "mllm.train", "--llama-dir", str(llama), "--tokenizer", str(tokenizer),
                        "--recipe", str(recipe), "--run-dir", str(tmp_path / "run2"), "--num-workers", "2"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "budget smaller than world_size * num_workers = 2" in p.stderr, p.stderr[-2000:]
    # records that give no sample (a `text_field` the files lack): refused by the probe, after the text tokenizer
    # is read and before the model is built (the loader found it after a pass over every file)
    make_llama_tokenizer(llama)
    recipe.write_text(f"name: field\nroot: {root}\nsources:\n  - name: web\n    kind: text\n"
                      "    paths: web/*.jsonl\n    weight: 1\n    text_field: content\n")
    p = subprocess.run([sys.executable, "-m", "mllm.train", "--llama-dir", str(llama), "--tokenizer", str(tokenizer),
                        "--recipe", str(recipe), "--run-dir", str(tmp_path / "run3")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0, p.stderr[-2000:]
    assert "none of 1 gives a training sample (max_len 2048): malformed 1 (e.g. 00000.jsonl:1: no field 'content')" \
        in p.stderr, p.stderr[-2000:]
    assert "initialised from" not in (tmp_path / "run3/log.txt").read_text()


# ---- counters -------------------------------------------------------------------------------------------------
def test_skip_counters_keep_sample_ids_and_merge_across_ranks(tmp_path, tok):
    long_doc = {"text": " ".join(["word"] * 400)}
    lines = [json.dumps(d) for d in ({"text": "short one"}, long_doc, {"text": None}, {"nope": 1}, {"text": "ok"})]
    _touch(tmp_path / "t/a.jsonl", ("\n".join(lines) + "\n").encode())
    write_code_shard(tmp_path / "p/00000.tar", pair_items(2) + [{"key": "nocodes", "txt": "x"}])
    recipe = Recipe("r", [SourceConfig(name="text", kind="text", paths=["t/a.jsonl"], weight=1.0,
                                       text_overflow="skip"),
                          SourceConfig(name="pairs", kind="pairs", paths=["p/*.tar"], weight=1.0)],
                    root=str(tmp_path))
    per_rank = []
    for rank in (0, 1):
        loader = MixtureLoader(recipe, tok, rank=rank, world_size=2, micro_batch_size=1, max_len=64, infinite=False)
        n = sum(1 for _ in loader)
        st = loader.stats()
        assert st["batches"] == n and 0 <= st["text_only_batches"] <= n
        per_rank.append(st)
    merged = merge_stats(per_rank)
    text = merged["sources"]["text"]
    assert text["skipped"]["too_long"] == 1 and text["skipped"]["empty_text"] == 1 and text["skipped"]["malformed"] == 1
    assert text["examples"]["too_long"][0].startswith("a.jsonl:2: ") and "max_len 64" in text["examples"]["too_long"][0]
    assert text["examples"]["malformed"] == ["a.jsonl:4: no field 'text'"]
    assert merged["sources"]["pairs"]["skipped"]["missing_image"] == 1
    assert "nocodes" in merged["sources"]["pairs"]["examples"]["missing_image"][0]
    assert merged["batches"] == sum(merged["batches_per_rank"]) == sum(s["batches"] for s in per_rank)
    line = format_stats(merged)
    assert "too_long=1 (e.g. a.jsonl:2" in line and "text-only=" in line
