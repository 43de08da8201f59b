"""`python -m runtime.weights`: downloads resume, are verified and land atomically; failures say what and where.

Everything runs against a threaded HTTP server on 127.0.0.1 that plays both roles: a plain file host
(Range requests honoured; a path can be made to break off half-way once) and a small Hugging Face Hub
(`/api/models/<repo>/revision/<rev>` listings with LFS sha256 / git blob ids, and `/<repo>/resolve/...`
files). The Hub entries go through the real huggingface_hub client, pointed at it with HF_ENDPOINT; the
plain ones through UNITOK_WEIGHTS_BASE_URL. No other network is touched.
"""
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from runtime import weights as W
from runtime.weights import Entry, fetch

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Hub:
    """What the fake server serves, and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)  # plain: "/name" -> body
    break_once: set[str] = field(default_factory=set)  # plain paths cut off half-way on their next GET
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> {filename: served body}
    listed: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo -> bodies the listing describes
    lfs: set[str] = field(default_factory=lambda: {"w.bin", "model.bin"})  # names listed as LFS files
    gated: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    tokens: list[str | None] = field(default_factory=list)  # Authorization header of each resolve request


class Handler(BaseHTTPRequestHandler):
    hub: Hub  # set per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              length: int | None = None):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _file(self, data: bytes, head: bool, extra: dict | None = None, cut: bool = False):
        rng = self.headers.get("Range")
        headers = dict(extra or {})
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"}, head=head)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self._send(206, data[start:], headers, head)
        if cut:  # promise the whole body, send half, hang up
            self._send(200, data[:len(data) // 2], headers, head, length=len(data))
            self.close_connection = True
            return None
        return self._send(200, data, headers, head)

    def _route(self, head: bool):
        hub, path = self.hub, self.path.split("?")[0]
        hub.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            repo, _, rev = path.removeprefix("/api/models/").partition("/revision/")
            return self._listing(repo, rev)
        if "/resolve/" in path:
            repo, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, filename = rest.partition("/")
            if repo in hub.gated:
                return self._send(401, b"gated", {"X-Error-Code": "GatedRepo",
                                                  "X-Error-Message": "Access to this repo is restricted"}, head)
            if repo not in hub.repos or filename not in hub.repos[repo]:
                return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"}, head)
            listed = hub.listed.get(repo, hub.repos[repo])[filename]
            etag = sha(listed) if filename in hub.lfs else blob_id(listed)
            hub.tokens.append(self.headers.get("Authorization"))
            cut = path in hub.break_once and not self.headers.get("Range")
            hub.break_once.discard(path)
            return self._file(hub.repos[repo][filename], head, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, cut)
        if path in hub.files:
            cut = path in hub.break_once and not self.headers.get("Range")
            hub.break_once.discard(path)
            return self._file(hub.files[path], head, cut=cut)
        return self._send(404, b"not found", head=head)

    def _listing(self, repo: str, rev: str):
        hub = self.hub
        if repo in hub.gated:
            return self._send(401, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "restricted"})
        if repo not in hub.repos:
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        siblings = []
        for name, data in hub.listed.get(repo, hub.repos[repo]).items():
            s = {"rfilename": name, "size": len(data), "blobId": blob_id(data)}
            if name in hub.lfs:
                s["lfs"] = {"sha256": sha(data), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        siblings.append({"rfilename": ".gitattributes", "size": 10, "blobId": "0" * 40})
        body = json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode()
        return self._send(200, body, {"Content-Type": "application/json"})

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


@pytest.fixture
def hub(monkeypatch):
    """A fresh fake host on 127.0.0.1; UNITOK_WEIGHTS_BASE_URL and HF_ENDPOINT point at it."""
    state = Hub()
    handler = type("H", (Handler,), {"hub": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv(W.BASE_URL_ENV, base)
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")  # never the machine's own login
    state.base = base
    yield state
    server.shutdown()
    server.server_close()


def url_entry(name: str, data: bytes, dest: str | None = None, **kw) -> Entry:
    return Entry(name=name, what="test", dest=dest or name, source="test", url=f"https://example.invalid/{name}",
                 sha256=kw.pop("sha256", sha(data)), size=kw.pop("size", len(data)), **kw)


def run(entries, to, names=(), **kw):
    lines = []
    result = fetch(names or [e.name for e in entries], to, entries=entries, log=lines.append, **kw)
    return result, "\n".join(lines)


def gets(hub: Hub, path: str) -> list:
    return [r for r in hub.requests if r[0] == "GET" and r[1] == path]


# ---- plain HTTPS ---------------------------------------------------------------------------------
def test_download_verifies_places_atomically_and_skips_a_verified_file(hub, tmp_path):
    data = bytes(range(256)) * 40
    hub.files["/w.pth"] = data
    e = url_entry("w.pth", data, uses=(("python -m unitok.train", "--loss.lpips-weights {path}"),))
    result, log = run([e], tmp_path)
    assert not result.failed and (tmp_path / "w.pth").read_bytes() == data
    assert not (tmp_path / "w.pth.part").exists()
    rec = json.loads((tmp_path / "w.pth.verified.json").read_text())
    assert rec["files"]["w.pth"] == {"sha256": sha(data), "size": len(data)}
    assert W.flag_lines(result.done) == [f"python -m unitok.train --loss.lpips-weights {tmp_path / 'w.pth'}"]
    # again: neither downloaded nor hashed (the record vouches while the size holds)
    hashed = []
    orig = W.sha256_file
    W.sha256_file = lambda p: hashed.append(p) or orig(p)
    try:
        result, log = run([e], tmp_path)
    finally:
        W.sha256_file = orig
    assert not result.failed and "verified, not downloaded again" in log
    assert len(gets(hub, "/w.pth")) == 1 and hashed == []
    # --recheck hashes it again, still no download
    result, _ = run([e], tmp_path, recheck=True)
    assert not result.failed and len(gets(hub, "/w.pth")) == 1


def test_existing_file_without_record_is_hashed_once_and_kept_or_replaced(hub, tmp_path):
    data = b"weights" * 100
    hub.files["/a.pth"] = data
    e = url_entry("a.pth", data)
    (tmp_path / "a.pth").write_bytes(data)  # copied by hand: kept, recorded
    result, log = run([e], tmp_path)
    assert not result.failed and gets(hub, "/a.pth") == []
    assert (tmp_path / "a.pth.verified.json").is_file()
    (tmp_path / "a.pth").write_bytes(b"x" * len(data))  # corrupted in place, same size: --recheck catches it
    result, log = run([e], tmp_path, recheck=True)
    assert not result.failed and "does not match" in log and len(gets(hub, "/a.pth")) == 1
    assert (tmp_path / "a.pth").read_bytes() == data


def test_truncated_transfer_keeps_the_part_and_the_next_run_resumes_with_range(hub, tmp_path):
    data = bytes(range(256)) * 64  # 16 KiB
    hub.files["/big.pth"] = data
    hub.break_once.add("/big.pth")
    e = url_entry("big.pth", data)
    result, log = run([e], tmp_path)
    (_, msg), = result.failed
    url = f"{hub.base}/big.pth"
    assert f"transfer of {url} ended after {len(data) // 2} of {len(data)} bytes" in msg
    assert "run the command again to resume" in msg and "FAILED" in log
    part = tmp_path / "big.pth.part"
    assert part.stat().st_size == len(data) // 2 and not (tmp_path / "big.pth").exists()
    result, log = run([e], tmp_path)
    assert not result.failed and (tmp_path / "big.pth").read_bytes() == data and not part.exists()
    assert gets(hub, "/big.pth")[-1][2] == f"bytes={len(data) // 2}-"  # the second run asked for the rest only
    assert "resuming at" in log


def test_checksum_mismatch_deletes_the_download_and_names_file_expected_and_got(hub, tmp_path):
    hub.files["/bad.pth"] = b"not the pinned bytes"
    pinned = sha(b"the pinned bytes")
    e = url_entry("bad.pth", b"", sha256=pinned, size=None)
    result, _ = run([e], tmp_path)
    (_, msg), = result.failed
    assert f"checksum mismatch for bad.pth from {hub.base}/bad.pth" in msg
    assert f"expected sha256 {pinned}, got {sha(b'not the pinned bytes')}" in msg and "deleted" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_404_and_refused_connection_name_the_url_and_other_entries_still_run(hub, tmp_path, monkeypatch):
    hub.files["/ok.pth"] = b"fine"
    missing, ok = url_entry("missing.pth", b"?"), url_entry("ok.pth", b"fine")
    result, _ = run([missing, ok], tmp_path)
    assert [e.name for e, _ in result.done] == ["ok.pth"]
    assert result.failed == [(missing, f"HTTP 404 (not found) for {hub.base}/missing.pth")]
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(W.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    result, _ = run([missing], tmp_path)
    (_, msg), = result.failed
    assert msg.startswith(f"cannot download http://127.0.0.1:{port}/missing.pth:") and "refused" in msg.lower()


def test_cli_exit_status_and_flags(hub, tmp_path, monkeypatch, capsys):
    hub.files["/vgg16-397923af.pth"] = b"vgg"
    e = Entry(name="lpips-vgg16", what="t", dest="vgg16.pth", source="t",
              url="https://download.pytorch.org/models/vgg16-397923af.pth", sha256=sha(b"vgg"),
              uses=(("python -m unitok.train", "--loss.lpips-weights {path}"),))
    broken = url_entry("gone.pth", b"?")
    monkeypatch.setattr(W, "ENTRIES", (e, broken))
    assert W.main(["fetch", "--to", str(tmp_path), "lpips-vgg16"]) == 0
    out = capsys.readouterr().out
    assert f"python -m unitok.train --loss.lpips-weights {tmp_path / 'vgg16.pth'}" in out
    assert W.main(["fetch", "--to", str(tmp_path), "lpips-vgg16", "gone.pth"]) == 1
    err = capsys.readouterr().err
    assert "1 failed" in err and f"HTTP 404 (not found) for {hub.base}/gone.pth" in err
    with pytest.raises(SystemExit) as exit_:
        W.main(["fetch", "no-such-entry"])
    assert exit_.value.code == 2 and "unknown pretrained input 'no-such-entry'" in capsys.readouterr().err
    assert W.main(["list"]) == 0 and "lpips-vgg16" in capsys.readouterr().out


def test_tilde_in_to_is_the_home_folder(hub, tmp_path, monkeypatch, capsys):
    """`--to=~/w` reaches the program with its tilde (bash expands one only at the start of a word): the files go
    to $HOME/w, not to a folder named `~` under the current one, and the printed flags name the real path."""
    hub.files["/vgg16-397923af.pth"] = b"vgg"
    e = Entry(name="lpips-vgg16", what="t", dest="vgg16.pth", source="t",
              url="https://download.pytorch.org/models/vgg16-397923af.pth", sha256=sha(b"vgg"),
              uses=(("python -m unitok.train", "--loss.lpips-weights {path}"),))
    monkeypatch.setattr(W, "ENTRIES", (e,))
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert W.main(["fetch", "--to=~/w", "lpips-vgg16"]) == 0
    assert (home / "w" / "vgg16.pth").read_bytes() == b"vgg" and list(cwd.iterdir()) == []
    assert f"--loss.lpips-weights {home / 'w' / 'vgg16.pth'}" in capsys.readouterr().out


# ---- Hugging Face Hub (real huggingface_hub client against the fake hub) ---------------------------
def hub_entry(name: str, repo: str, **kw) -> Entry:
    return Entry(name=name, what="test", dest=kw.pop("dest", name), source="test", repo=repo, **kw)


def test_hub_file_and_folder_verified_against_the_listing_and_skipped_when_verified(hub, tmp_path):
    weights, config = b"\x00\x01" * 3000, b'{"model_type": "llama"}'
    hub.repos["org/tok"] = {"w.bin": weights, "README.md": b"readme"}
    hub.repos["org/folder"] = {"model.bin": weights, "config.json": config}
    single = hub_entry("tok", "org/tok", files=("w.bin",), dest="tok/w.bin")
    folder = hub_entry("folder", "org/folder", files=("*",), folder=True)
    result, log = run([single, folder], tmp_path)
    assert not result.failed, result.failed
    assert (tmp_path / "tok" / "w.bin").read_bytes() == weights
    assert (tmp_path / "folder" / "model.bin").read_bytes() == weights
    assert (tmp_path / "folder" / "config.json").read_bytes() == config
    assert not (tmp_path / "folder" / ".gitattributes").exists() and not (tmp_path / ".partial").exists()
    rec = json.loads((tmp_path / "folder.verified.json").read_text())
    assert rec["source"] == f"org/folder@{COMMIT}"
    assert rec["files"]["config.json"]["git_blob_id"] == blob_id(config)
    assert rec["files"]["model.bin"]["sha256"] == sha(weights)
    assert f"at commit {COMMIT}" in log
    n = len(hub.requests)
    result, log = run([single, folder], tmp_path)
    assert not result.failed and log.count("verified, not downloaded again") == 3
    assert all("/resolve/" not in p for _, p, _ in hub.requests[n:])  # listings only


def test_hub_checksum_mismatch_deletes_the_file(hub, tmp_path):
    good = b"A" * 4096
    hub.repos["org/tampered"] = {"w.bin": b"B" * 4096}  # same size, other bytes
    hub.listed["org/tampered"] = {"w.bin": good}
    e = hub_entry("t", "org/tampered", files=("w.bin",), dest="t.bin")
    result, _ = run([e], tmp_path)
    (_, msg), = result.failed
    assert f"checksum mismatch for w.bin from {hub.base}/org/tampered/resolve/{COMMIT}/w.bin" in msg
    assert f"expected sha256 {sha(good)}, got {sha(b'B' * 4096)}" in msg
    assert not (tmp_path / "t.bin").exists()
    assert not any(p.is_file() and p.name == "w.bin" for p in tmp_path.rglob("*"))


def test_hub_missing_repo_missing_file_and_gated_repo_are_clear(hub, tmp_path):
    hub.repos["org/has"] = {"w.bin": b"w" * 10}
    hub.gated.add("meta/gated")
    nope = hub_entry("nope", "org/nope", files=("w.bin",))
    lacking = hub_entry("lacking", "org/has", files=("other.bin",))
    gated = hub_entry("gated", "meta/gated", files=("config.json",), folder=True, gated=True)
    result, _ = run([nope, lacking, gated], tmp_path)
    msgs = {e.name: m for e, m in result.failed}
    assert msgs["nope"] == f"repository org/nope not found at {hub.base} (or private without a token)"
    assert msgs["lacking"] == (f"org/has@{COMMIT} has no file matching ['other.bin'] "
                               f"({hub.base}/api/models/org/has/revision/main)")
    assert msgs["gated"].startswith(f"meta/gated is gated: accept its license at {hub.base}/meta/gated")
    # a file listed but gone from the server: a 404 naming the URL
    hub.listed["org/has"] = {"w.bin": b"w" * 10, "gone.bin": b"g"}
    hub.lfs.add("gone.bin")
    gone = hub_entry("gone", "org/has", files=("gone.bin",))
    result, _ = run([gone], tmp_path)
    assert result.failed[0][1] == f"HTTP 404 (not found) for {hub.base}/org/has/resolve/{COMMIT}/gone.bin"


def test_an_interrupted_hub_download_resumes_and_files_verified_earlier_are_kept_offline(hub, tmp_path, monkeypatch):
    """huggingface_hub's download deleted its partial file on failure: a cut 10 GB Llama shard started over from
    byte 0. And offline (HF_HUB_OFFLINE, a machine the files were copied to) every Hub entry FAILED, although its
    files were there and verified."""
    weights = bytes(range(256)) * 64
    hub.repos["org/big"] = {"w.bin": weights, "config.json": b"{}"}
    path = f"/org/big/resolve/{COMMIT}/w.bin"
    hub.break_once.add(path)
    e = hub_entry("big", "org/big", files=("*",), folder=True)
    result, log = run([e], tmp_path)
    (_, msg), = result.failed
    assert "ended after 8192 of 16384 bytes" in msg and "run the command again to resume" in msg
    assert (tmp_path / ".partial" / "big" / "w.bin.part").stat().st_size == len(weights) // 2
    result, log = run([e], tmp_path)
    assert not result.failed, result.failed
    assert [r[2] for r in gets(hub, path)] == [None, f"bytes={len(weights) // 2}-"] and "resuming at" in log
    assert (tmp_path / "big" / "w.bin").read_bytes() == weights and not (tmp_path / ".partial").exists()
    assert set(hub.tokens) == {"Bearer hf_test_token_not_real"}
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result, log = run([e], tmp_path)
    assert not result.failed and f"its 2 files verified earlier (org/big@{COMMIT}) are in place, kept" in log
    (tmp_path / "big" / "w.bin").write_bytes(weights[:100])  # no longer what was verified: not accepted
    result, _ = run([e], tmp_path)
    assert result.failed and "cannot download http://127.0.0.1:9/api/models/org/big" in result.failed[0][1]


def test_default_selection_skips_gated_entries():
    names = [e.name for e in W.select([])]
    assert "llama-2-7b" not in names and "lpips-vgg16" in names
    assert [e.name for e in W.select(["llama-2-7b"])] == ["llama-2-7b"]


# ---- the real table --------------------------------------------------------------------------------
def test_entries_are_pinned_and_consistent():
    import importlib.util

    for e in W.ENTRIES:
        assert e.url or e.revision, e.name
        if e.url:
            assert e.url.startswith("https://") and e.sha256 and e.size, e.name
            stem = e.url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            suffix = stem.rsplit("-", 1)[-1]
            if len(suffix) == 8 and all(c in "0123456789abcdef" for c in suffix):  # torch.hub-style name
                assert e.sha256.startswith(suffix), e.name
        assert e.uses or e.note, e.name
    heads = Path(importlib.util.find_spec("lpips").origin).parent / "weights" / "v0.1" / "vgg.pth"  # no import
    assert W.sha256_file(heads) == W.BY_NAME["lpips-heads"].sha256
    assert heads.stat().st_size == W.BY_NAME["lpips-heads"].size
    assert len(W.BY_NAME["llama-2-7b"].revision) == 40 and W.BY_NAME["llama-2-7b"].gated


def test_fetch_hint_names_the_command_and_the_file():
    assert W.fetch_hint("dinov2-vits14") == (
        "get it with `python -m runtime.weights fetch --to external dinov2-vits14` on a machine with internet "
        "(it writes external/dinov2_vits14_pretrain.pth)")
    with pytest.raises(ValueError, match="unknown pretrained input"):
        W.fetch_hint("nope")
    # a folder with a space stays one argument when the printed command is pasted into a shell
    assert "`python -m runtime.weights fetch --to '/data/my weights' dinov2-vits14`" in W.fetch_hint(
        "dinov2-vits14", "/data/my weights")
    lpips = W.BY_NAME["lpips-vgg16"]
    assert W.flag_lines([(lpips, Path("/data/my weights/vgg16.pth"))]) == [
        "python -m unitok.train --loss.lpips-weights '/data/my weights/vgg16.pth'"]


def test_missing_pretrained_files_name_the_fetch_command(tmp_path):
    from unitok.evaluate import check_local_weights
    from unitok.loading import load_tokenizer
    from unitok.losses.perceptual import PerceptualLoss
    from unitok.models.discriminator import DinoDiscriminator

    nope = tmp_path / "nope.pth"
    cases = [(lambda: PerceptualLoss(nope), "lpips-vgg16"), (lambda: DinoDiscriminator(nope), "dinov2-vits14"),
             (lambda: check_local_weights(nope), "inception"), (lambda: load_tokenizer(nope), "unitok-tokenizer")]
    for make, name in cases:
        with pytest.raises(FileNotFoundError) as err:
            make()
        msg = str(err.value)
        assert str(nope) in msg and f"python -m runtime.weights fetch --to external {name}`" in msg


def test_tokenizer_trainer_names_the_fetch_command_for_each_missing_input(tmp_path):
    from unitok.train import load_clip_init, parse_config

    nope = str(tmp_path / "nope.pth")
    base = ["--preset", "debug", "--loss.lpips", "0", "--gan.no-enabled"]
    lpips = ["--loss.lpips", "1", "--loss.lpips-weights", nope]
    for flags, flag, name in ((lpips, "--loss.lpips-weights", "lpips-vgg16"),
                              (["--gan.enabled", "--gan.dino-weights", nope], "--gan.dino-weights", "dinov2-vits14"),
                              (["--clip-init", nope], "--clip-init", "vitamin-l-256")):
        with pytest.raises(FileNotFoundError) as err:
            parse_config(base + flags)
        assert str(err.value).startswith(f"{flag}: file not found: {nope}; get it with")
        assert f"fetch --to external {name}`" in str(err.value)
    with pytest.raises(FileNotFoundError, match="fetch --to external vitamin-l-256`"):
        load_clip_init(None, nope, None)
