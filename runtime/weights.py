"""Pretrained inputs: one command downloads them, verified, into the layout the trainers' flags expect.

    python -m runtime.weights list                               # names, sizes, sources, pins
    python -m runtime.weights fetch --to external [NAME ...]     # default: every entry that is not gated

Run `fetch` on a machine with internet and copy the folder to the training machines: the trainers and
evaluators read every pretrained file from a local path, and name the `fetch` command that gets it
when it is missing (`fetch_hint`). At the end `fetch` prints the flags that pass each file.

What `fetch` guarantees, per file:
- plain HTTPS (urllib): the body goes to `<dest>.part`; an interrupted transfer keeps it and the next
  run continues it with an HTTP Range request; then its sha256 is checked against the pin below and it
  is moved into place with one rename;
- Hugging Face Hub: the repository listing at the pinned revision (huggingface_hub) gives each file's
  LFS sha256 (or, for a small non-LFS file, its git blob id); the file comes from its resolve URL into
  `<to>/.partial/<name>/<file>.part`, resumed by the next run like a plain HTTPS one, checked the same
  way, then renamed into place. Where the listing cannot be had (offline: HF_HUB_OFFLINE, a machine the
  files were copied to), an entry whose recorded files are all there with their size is kept;
- a checksum mismatch deletes the downloaded file and says so (file, URL, expected, got);
- a verified file is recorded in `<dest>.verified.json` (sha256, size, source, revision); while it keeps
  that size it is neither downloaded nor hashed again (`--recheck` hashes it again). A file already
  there without a record is hashed once and kept when it matches;
- a 404, a refused connection, a gated repository or a truncated transfer ends that entry with one line
  naming the URL; the other entries still run, and the exit status is 1 when any failed.

Environment: UNITOK_WEIGHTS_BASE_URL serves every plain-HTTPS entry from a flat mirror
(`$UNITOK_WEIGHTS_BASE_URL/<file name of the URL>`); HF_ENDPOINT points the Hub entries at a mirror
(read at call time); HF_TOKEN or `hf auth login` supplies the token of a gated repository (Llama-2).

Where the pins come from (looked up from public sources; the machine that wrote this had no access to
the hosts, so nothing here was downloaded to compute a hash):
- full sha256 and size of the torchvision VGG16, DINOv2 ViT-S/14 and torch-fidelity Inception files:
  recorded by several independent public projects that pin these exact files (each value agrees across
  at least two of them, and the torchvision / torch-fidelity values start with the hash prefix in the
  file name, which torch.hub checks);
- LPIPS v0.1 VGG heads: the same sha256 is pinned by public projects at PerceptualSimilarity commit
  082bb24f, and equals the file shipped in the lpips 0.1.4 wheel (checked by the tests);
- Llama-2-7b-hf: commit 01c7f73d is the snapshot hash public projects load Llama-2-7b-hf from (its
  last commit); the files are verified against the Hub listing at that commit, which is immutable;
- FoundationVision/unitok_tokenizer, FoundationVision/unitok_mllm (named in the UniTok README) and
  jienengchen/ViTamin-L-256px (open_clip 3.3's `ViTamin-L-256` datacomp1b tag): no commit hash or
  sha256 could be found offline, so these track the branch `main` and are verified against the Hub's
  listing at the commit `main` resolves to; that commit is printed and recorded beside the files.
"""
from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import os
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from tyro.conf import Positional, arg

DEFAULT_DIR = "external"
BASE_URL_ENV = "UNITOK_WEIGHTS_BASE_URL"
TIMEOUT_S = 60.0  # per socket operation, not per file
CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """A download or verification failed; the message names the file and the URL (`status`: the HTTP code)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Entry:
    """One pretrained input: where it comes from, how it is pinned, where it goes, which flag reads it."""

    name: str
    """Name on the command line (`fetch NAME`)."""
    what: str
    """One line: what it is and who reads it."""
    dest: str
    """Path under `--to`: a file, or a folder for a Hub entry with `folder=True`."""
    source: str
    """Where the URL, revision and checksum were found."""
    uses: tuple[tuple[str, str], ...] = ()
    """(command, flag with {path}) pairs printed after a fetch."""
    note: str = ""
    """Printed after a fetch when there is no flag to pass."""
    url: str | None = None
    """Plain HTTPS source (exclusive with repo)."""
    sha256: str | None = None
    """Pinned sha256 (required for url entries; optional for a single-file Hub entry)."""
    size: int | None = None
    """Size in bytes, when known."""
    repo: str | None = None
    """Hugging Face model repository (exclusive with url)."""
    revision: str = "main"
    """Hub revision: a commit hash where one is known, else a branch."""
    files: tuple[str, ...] = ()
    """Hub file names or fnmatch patterns; each must match at least one file of the repository."""
    exclude: tuple[str, ...] = (".gitattributes",)
    """Hub files never fetched."""
    folder: bool = False
    """Hub entry kept as a folder (`dest/<file>`); otherwise exactly one file, saved as `dest`."""
    gated: bool = False
    """Needs an accepted license and a token; fetched only when named."""

    def __post_init__(self):
        if (self.url is None) == (self.repo is None):
            raise ValueError(f"{self.name}: give exactly one of url and repo")
        if self.url is not None and self.sha256 is None:
            raise ValueError(f"{self.name}: a plain-HTTPS entry needs a pinned sha256")
        if self.sha256 is not None and (len(self.sha256) != 64 or set(self.sha256) - set("0123456789abcdef")):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if self.repo is not None and not self.files:
            raise ValueError(f"{self.name}: a Hub entry needs files")
        if self.folder and self.sha256 is not None:
            raise ValueError(f"{self.name}: a folder entry cannot pin one sha256")

    @property
    def origin(self) -> str:
        """The URL, or repo@revision, as `list` shows it."""
        return self.url if self.url else f"hf://{self.repo}@{self.revision}"


_TRAIN = "python -m unitok.train"
_EVAL = "python -m unitok.evaluate"
_MLLM_EVAL = "python -m mllm.evaluate --task fid"
_PRETRAIN = "python -m mllm.train --stage pretrain"
_CHAT = "python -m mllm.chat"

ENTRIES: tuple[Entry, ...] = (
    Entry(
        name="lpips-vgg16", what="VGG16 ImageNet trunk of the LPIPS loss (torchvision IMAGENET1K_V1)",
        dest="vgg16.pth", url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0", size=553_433_881,
        uses=((_TRAIN, "--loss.lpips-weights {path}"),),
        source="torchvision's URL (the name carries sha256 prefix 397923af); full sha256 and size as pinned by "
               "independent public projects (two agree)"),
    Entry(
        name="lpips-heads", what="LPIPS v0.1 linear heads for VGG (the lpips package ships the same file)",
        dest="lpips_vgg_v0.1.pth",
        url="https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
            "082bb24f84c091ea94de2867d34c4544f68e0963/lpips/weights/v0.1/vgg.pth",
        sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868", size=7_289,
        note="no flag: the LPIPS loss uses the lpips package's copy of these heads, which has this sha256",
        source="PerceptualSimilarity at commit 082bb24f (pinned with this sha256 by public projects); equals "
               "lpips 0.1.4's weights/v0.1/vgg.pth"),
    Entry(
        name="dinov2-vits14", what="DINOv2 ViT-S/14 backbone of the GAN discriminator (official layout)",
        dest="dinov2_vits14_pretrain.pth",
        url="https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        sha256="b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9", size=88_283_115,
        uses=((_TRAIN, "--gan.dino-weights {path}"),),
        source="facebookresearch/dinov2 hubconf URL; sha256 and size as pinned by public projects (refiners "
               "and others agree)"),
    Entry(
        name="inception", what="Inception-v3 (TF 2015-12-05 port) that torch-fidelity uses for FID/IS",
        dest="weights-inception-2015-12-05-6726825d.pth",
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
            "weights-inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", size=95_628_359,
        uses=((_EVAL, "--inception-weights {path}"), (_MLLM_EVAL, "--inception-weights {path}")),
        source="URL_INCEPTION_V3 in torch-fidelity 0.4.0 (the name carries sha256 prefix 6726825d); full sha256 "
               "and size as pinned by public projects (several agree)"),
    Entry(
        name="unitok-tokenizer", what="released UniTok tokenizer checkpoint (April 2025, full attention)",
        dest="unitok_tokenizer.pth", repo="FoundationVision/unitok_tokenizer", files=("unitok_tokenizer.pth",),
        uses=((_PRETRAIN, "--tokenizer {path}"), (_CHAT, "--tokenizer {path}"),
              ("python -m unitok.convert", "{path} OUT_DIR")),
        source="HF repo linked from the UniTok README; branch main (no commit hash found), verified against "
               "the Hub's LFS sha256"),
    Entry(
        name="unitok-mllm", what="released UniTok MLLM folder (Llama-2-7B based, Liquid layout)",
        dest="unitok_mllm", repo="FoundationVision/unitok_mllm", files=("*",), folder=True,
        uses=((_CHAT, "--model {path} --official-mllm"), ("python -m mllm.modeling.official", "{path} OUT_DIR")),
        source="HF repo named in the UniTok README; branch main (no commit hash found), verified against the "
               "Hub's listing (LFS sha256, git blob id for small files)"),
    Entry(
        name="llama-2-7b", what="Llama-2-7B transformers folder (weights and sentencepiece tokenizer)",
        dest="Llama-2-7b-hf", repo="meta-llama/Llama-2-7b-hf",
        revision="01c7f73d771dfac7d292323805ebc428287df4f9", folder=True, gated=True,
        files=("config.json", "generation_config.json", "model.safetensors.index.json", "model-*.safetensors",
               "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "LICENSE.txt"),
        uses=((_PRETRAIN, "--llama-dir {path}"),),
        source="gated HF repo (accept Meta's license, then `hf auth login` or HF_TOKEN); commit 01c7f73d is the "
               "snapshot public projects load it from; verified against the Hub's listing at that commit"),
    Entry(
        name="vitamin-l-256", what="open_clip ViTamin-L-256 (datacomp1b) checkpoint for the CLIP-init variant",
        dest="ViTamin-L-256px/pytorch_model.bin", repo="jienengchen/ViTamin-L-256px", files=("pytorch_model.bin",),
        uses=((_TRAIN, "--clip-init {path}"),),
        source="open_clip 3.3 pretrained tag ViTamin-L-256/datacomp1b (hf_hub jienengchen/ViTamin-L-256px/"
               "pytorch_model.bin); branch main (no commit hash found), verified against the Hub's LFS sha256"),
)
BY_NAME = {e.name: e for e in ENTRIES}


def get_entry(name: str, entries: Iterable[Entry] | None = None) -> Entry:
    """The entry called `name` (of `entries`, default ENTRIES); ValueError naming the known ones otherwise."""
    table = {e.name: e for e in (ENTRIES if entries is None else entries)}
    if name not in table:
        raise ValueError(f"unknown pretrained input {name!r}; known: {', '.join(table)}")
    return table[name]


def fetch_hint(name: str, to: str = DEFAULT_DIR) -> str:
    """The sentence an error appends when a pretrained file is missing, e.g. "get it with
    `python -m runtime.weights fetch --to external lpips-vgg16` on a machine with internet (it writes
    external/vgg16.pth)"."""
    e = get_entry(name)
    gated = "; the repository is gated: accept its license on the Hub and log in first" if e.gated else ""
    return (f"get it with `python -m runtime.weights fetch --to {shlex.quote(str(to))} {e.name}` on a machine with "
            f"internet (it writes {Path(to) / e.dest}{gated})")


# ---- hashing and the verification record ------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_id(path: str | os.PathLike) -> str:
    """Git's object id of a file (what the Hub lists for a small, non-LFS file)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _record_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified.json")


def _read_record(dest: Path) -> dict:
    try:
        rec = json.loads(_record_path(dest).read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


def _write_record(dest: Path, rec: dict) -> None:
    path = _record_path(dest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _file_record(path: Path, with_blob_id: bool) -> dict:
    """What the verification record keeps of a file: sha256, size and, for a small non-LFS Hub file, its
    git blob id."""
    rec = {"sha256": sha256_file(path), "size": path.stat().st_size}
    if with_blob_id:
        rec["git_blob_id"] = git_blob_id(path)
    return rec


def _matches(rec: dict, sha256: str | None, blob_id: str | None) -> bool:
    """Whether a file record has the expected checksums (None: not checked)."""
    return (sha256 is None or rec.get("sha256") == sha256) and (blob_id is None or rec.get("git_blob_id") == blob_id)


def _already_verified(target: Path, rec_files: dict, rel: str, sha256: str | None, blob_id: str | None,
                      recheck: bool, log: Callable[[str], None]) -> bool:
    """Whether `target` holds the expected bytes; updates `rec_files[rel]` when it had to hash it."""
    if not target.is_file():
        return False
    cached = rec_files.get(rel) or {}
    if not recheck and cached.get("size") == target.stat().st_size and _matches(cached, sha256, blob_id):
        return True
    got = _file_record(target, blob_id is not None)
    if _matches(got, sha256, blob_id):
        rec_files[rel] = got
        return True
    want = f"sha256 {sha256}" if sha256 is not None else f"git blob {blob_id}"
    log(f"  {target} is there but does not match (expected {want}, got sha256 {got['sha256']}); downloading it again")
    rec_files.pop(rel, None)
    return False


# ---- plain HTTPS --------------------------------------------------------------------------------
def entry_url(e: Entry) -> str:
    """The entry's URL, or its file on the flat mirror named by $UNITOK_WEIGHTS_BASE_URL."""
    base = os.environ.get(BASE_URL_ENV, "").strip()
    return f"{base.rstrip('/')}/{e.url.rsplit('/', 1)[-1]}" if base else e.url


class _Progress:
    """One line every few seconds for files over 8 MiB: done / total MiB, percent, rate."""

    def __init__(self, label: str, total: int | None, start: int, log: Callable[[str], None], every_s: float = 5.0):
        self.label, self.total, self.log, self.every_s = label, total, log, every_s
        self.t0 = self.last = time.monotonic()
        self.start = start
        self.quiet = total is not None and total < 8 * CHUNK

    def __call__(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not final and now - self.last < self.every_s):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-6) / CHUNK
        of = f" / {self.total / CHUNK:.0f} MiB ({100 * done / self.total:.0f} %)" if self.total else " MiB"
        self.log(f"  {self.label}: {done / CHUNK:.0f}{of}, {rate:.1f} MiB/s")


def download_url(url: str, dest: Path, sha256: str, size: int | None = None,
                 log: Callable[[str], None] = print) -> None:
    """Resumable download of `url` to `dest`: `<dest>.part`, sha256 check, one rename into place.

    Raises WeightsError on an HTTP error, a refused connection, a truncated transfer (the part file is
    kept for the next run) or a checksum mismatch (the part file is deleted)."""
    part = _resume(url, dest, size, log)
    got = sha256_file(part)
    if got != sha256:
        n = part.stat().st_size
        part.unlink()
        raise WeightsError(f"checksum mismatch for {dest.name} from {url}: expected sha256 {sha256}, got {got} "
                           f"({n} bytes); the download was deleted")
    os.replace(part, dest)


def _resume(url: str, dest: Path, size: int | None, log: Callable[[str], None], token: str | None = None) -> Path:
    """`<dest>.part` holding the whole body of `url`: an earlier run's part is continued (a Range request), one
    longer than `size` is started over. Not checked: the caller checks and renames it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # longer than the real file: cannot be a prefix of it
        part.unlink()
        have = 0
    if size is None or have < size:
        _transfer(url, part, have, size, dest.name, log, token)
    return part


class _TokenStaysOnItsHost(urllib.request.HTTPRedirectHandler):
    """urllib keeps every header across a redirect: the Hub's token would go to the storage host it redirects
    to (whose signed URL also refuses a second credential). It is dropped when the host changes, as requests
    (huggingface_hub's client) does."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _transfer(url: str, part: Path, have: int, size: int | None, label: str, log: Callable[[str], None],
              token: str | None = None) -> None:
    """Append the body of `url` from byte `have` to `part` (a Range request when have > 0)."""
    headers = {"User-Agent": "unitok-mllm-weights/1", "Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if have:
        headers["Range"] = f"bytes={have}-"
        log(f"  {label}: resuming at {have / CHUNK:.1f} MiB")
    try:
        resp = urllib.request.build_opener(_TokenStaysOnItsHost).open(urllib.request.Request(url, headers=headers),
                                                                      timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part is whole; the checksum decides
            return
        reason = "not found" if e.code == 404 else e.reason
        raise WeightsError(f"HTTP {e.code} ({reason}) for {url}", e.code) from None
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(f"cannot download {url}: {getattr(e, 'reason', e)}") from None
    with resp:
        if have and resp.status != 206:  # the server ignored the Range request: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        done, broken = have, None
        progress = _Progress(label, total, have, log)
        with open(part, "ab" if have else "wb") as f:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    progress(done)
            except (http.client.HTTPException, OSError) as e:
                broken = e
        progress(done, final=True)
    if broken is not None or (total is not None and done < total):
        of = f" of {total}" if total is not None else ""
        why = f" ({type(broken).__name__})" if broken is not None else ""
        raise WeightsError(f"transfer of {url} ended after {done}{of} bytes{why}; kept {part}: run the command "
                           "again to resume")


def _fetch_url(e: Entry, to: Path, recheck: bool, log: Callable[[str], None]) -> Path:
    dest = to / e.dest
    rec = _read_record(dest)
    if _already_verified(dest, rec["files"], dest.name, e.sha256, None, recheck, log):
        log(f"{e.name}: {dest} verified, not downloaded again")
    else:
        url = entry_url(e)
        log(f"{e.name}: downloading {url}")
        download_url(url, dest, e.sha256, e.size, log)
        rec["files"][dest.name] = {"sha256": e.sha256, "size": dest.stat().st_size}
        log(f"{e.name}: {dest} sha256 {e.sha256} ok")
    _write_record(dest, {"entry": e.name, "source": e.url, "files": rec["files"]})
    return dest


# ---- Hugging Face Hub --------------------------------------------------------------------------
def hub_endpoint() -> str:
    """$HF_ENDPOINT read now (huggingface_hub reads it once at import), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def _gated(e: Entry) -> WeightsError:
    return WeightsError(f"{e.repo} is gated: accept its license at {hub_endpoint()}/{e.repo} with your account, "
                        "then run `hf auth login` (or set HF_TOKEN) on this machine")


def _hub_error(e: Entry, err: Exception, url: str) -> WeightsError:
    """A huggingface_hub exception -> one line naming the repository or the URL."""
    from huggingface_hub import errors

    def _is(name: str) -> bool:
        cls = getattr(errors, name, None)
        return cls is not None and isinstance(err, cls)

    if _is("GatedRepoError"):
        return _gated(e)
    if _is("RepositoryNotFoundError"):
        return WeightsError(f"repository {e.repo} not found at {hub_endpoint()} (or private without a token)")
    if _is("RevisionNotFoundError"):
        return WeightsError(f"revision {e.revision} not found in {e.repo} ({url})")
    if _is("EntryNotFoundError"):
        return WeightsError(f"HTTP 404 (not found) for {url}")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return WeightsError(f"cannot download {url}: {type(err).__name__}: {first}")


@dataclass
class _HubFile:
    name: str
    size: int | None
    sha256: str | None
    blob_id: str | None


def _hub_listing(e: Entry) -> tuple[str, list[_HubFile]]:
    """(commit, the files the entry takes) from the Hub's listing at the entry's revision."""
    from huggingface_hub import HfApi

    url = f"{hub_endpoint()}/api/models/{e.repo}/revision/{e.revision}"
    try:
        info = HfApi(endpoint=hub_endpoint()).model_info(e.repo, revision=e.revision, files_metadata=True)
    except Exception as err:  # noqa: BLE001 - every hub/network failure becomes one line naming the URL
        raise _hub_error(e, err, url) from None
    listed = [s for s in (info.siblings or []) if not any(fnmatch.fnmatch(s.rfilename, x) for x in e.exclude)]
    take = [s for s in listed if any(fnmatch.fnmatch(s.rfilename, p) for p in e.files)]
    unmatched = [p for p in e.files if not any(fnmatch.fnmatch(s.rfilename, p) for s in listed)]
    if unmatched:
        raise WeightsError(f"{e.repo}@{info.sha or e.revision} has no file matching {unmatched} ({url})")
    if not e.folder and len(take) != 1:
        raise WeightsError(f"{e.name}: expected one file in {e.repo}, the patterns match {[s.rfilename for s in take]}")
    if not info.sha:
        raise WeightsError(f"the Hub listing of {e.repo} at {e.revision} names no commit ({url})")
    out = []
    for s in take:
        lfs_sha = s.lfs.sha256 if s.lfs is not None else None
        if lfs_sha is None and s.blob_id is None:
            raise WeightsError(f"the Hub listing gives no checksum for {s.rfilename} in {e.repo} ({url})")
        out.append(_HubFile(s.rfilename, s.size, lfs_sha, None if lfs_sha else s.blob_id))
    return info.sha, out


def _hub_download(e: Entry, f: _HubFile, commit: str, staging: Path, log: Callable[[str], None]) -> Path:
    """One Hub file into the staging folder, through its resolve URL (the token from HF_TOKEN or `hf auth
    login`): an interrupted transfer keeps `<file>.part` and the next run continues it with a Range request.
    (huggingface_hub's own download deletes its partial file on failure: a cut 10 GB shard started over.)"""
    from huggingface_hub import get_token

    url = f"{hub_endpoint()}/{e.repo}/resolve/{commit}/{f.name}"
    staged = staging / f.name
    try:
        part = _resume(url, staged, f.size, log, get_token())
    except WeightsError as err:
        if err.status in (401, 403):
            raise _gated(e) from None
        raise
    os.replace(part, staged)
    return staged


def _fetch_hub(e: Entry, to: Path, recheck: bool, log: Callable[[str], None]) -> Path:
    dest = to / e.dest
    try:
        commit, files = _hub_listing(e)
    except WeightsError as err:  # offline (HF_HUB_OFFLINE, a machine the files were copied to): the record
        if (done := _verified_earlier(e, dest, recheck)) is None:
            raise
        log(f"{e.name}: cannot list {e.repo} ({err}); its {done} files verified earlier ({_read_record(dest)['source']}) "
            "are in place, kept")
        return dest
    if e.sha256 is not None and files[0].sha256 != e.sha256:
        raise WeightsError(f"{e.repo}@{commit} lists sha256 {files[0].sha256} for {files[0].name}, the pin is "
                           f"{e.sha256}; refusing it")
    log(f"{e.name}: {e.repo} at commit {commit} ({len(files)} file{'s' if len(files) != 1 else ''})")
    rec = _read_record(dest)
    staging = to / ".partial" / e.name
    for f in files:
        target = dest / f.name if e.folder else dest
        rel = f.name if e.folder else dest.name
        if _already_verified(target, rec["files"], rel, f.sha256, f.blob_id, recheck, log):
            log(f"  {target} verified, not downloaded again")
            continue
        url = f"{hub_endpoint()}/{e.repo}/resolve/{commit}/{f.name}"
        log(f"  downloading {url}")
        staged = _hub_download(e, f, commit, staging, log)
        got = _file_record(staged, f.blob_id is not None)
        if not _matches(got, f.sha256, f.blob_id):
            staged.unlink()
            kind, want, have = (("sha256", f.sha256, got["sha256"]) if f.sha256 else
                                ("git blob", f.blob_id, got["git_blob_id"]))
            raise WeightsError(f"checksum mismatch for {f.name} from {url}: expected {kind} {want}, got {have}; "
                               "the download was deleted")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        rec["files"][rel] = got
        # written after every file, so a folder interrupted half-way keeps what was verified
        _write_record(dest, {"entry": e.name, "source": f"{e.repo}@{commit}", "files": rec["files"]})
    _write_record(dest, {"entry": e.name, "source": f"{e.repo}@{commit}", "files": rec["files"]})
    shutil.rmtree(staging, ignore_errors=True)
    if staging.parent.is_dir() and not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return dest


def _verified_earlier(e: Entry, dest: Path, recheck: bool) -> int | None:
    """How many files an earlier fetch of `e` verified and recorded, when all of them are still there with
    their recorded size (and, with --recheck, sha256); else None."""
    rec = _read_record(dest)
    if rec.get("entry") != e.name or not rec["files"]:
        return None
    for rel, r in rec["files"].items():
        path = dest / rel if e.folder else dest
        if not path.is_file() or path.stat().st_size != r.get("size"):
            return None
        if recheck and sha256_file(path) != r.get("sha256"):
            return None
    return len(rec["files"])


# ---- fetch ---------------------------------------------------------------------------------------
@dataclass
class FetchResult:
    """What one `fetch` did: the entries now in place and the ones that failed (with their message)."""

    done: list[tuple[Entry, Path]] = field(default_factory=list)
    failed: list[tuple[Entry, str]] = field(default_factory=list)


def select(names: Iterable[str], entries: Iterable[Entry] | None = None) -> list[Entry]:
    """The named entries (any, gated included), or every entry that is not gated when none is named."""
    entries = tuple(ENTRIES if entries is None else entries)
    names = list(dict.fromkeys(names))
    if not names:
        return [e for e in entries if not e.gated]
    return [get_entry(n, entries) for n in names]


def fetch(names: Iterable[str] = (), to: str | os.PathLike = DEFAULT_DIR, *, recheck: bool = False,
          entries: Iterable[Entry] | None = None, log: Callable[[str], None] = print) -> FetchResult:
    """Download, verify and place the named entries (see the module docstring); never raises for one
    entry's failure: it is reported in the result and the next entry runs."""
    to = Path(to).expanduser()  # `--to=~/w`: the shell leaves a tilde after `--flag=` as it is
    out = FetchResult()
    for e in select(names, entries):
        try:
            path = _fetch_url(e, to, recheck, log) if e.url else _fetch_hub(e, to, recheck, log)
            out.done.append((e, path))
        except WeightsError as err:
            log(f"{e.name}: FAILED: {err}")
            out.failed.append((e, str(err)))
    return out


def flag_lines(done: Iterable[tuple[Entry, Path]]) -> list[str]:
    """The flags to pass, grouped by command, for the entries in place."""
    by_cmd: dict[str, list[str]] = {}
    notes = []
    for e, path in done:
        for cmd, flag in e.uses:
            by_cmd.setdefault(cmd, []).append(flag.format(path=shlex.quote(str(path))))  # pasted into a shell
        if e.note:
            notes.append(f"{e.name}: {e.note}")
    return [f"{cmd} {' '.join(flags)}" for cmd, flags in by_cmd.items()] + notes


def _fmt_size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


# ---- command line -------------------------------------------------------------------------------
@dataclass
class ListConfig:
    """List the pretrained inputs: name, size, source and pin, destination, flags."""

    verbose: bool = False
    """Also print where each pin was found."""


@dataclass
class FetchConfig:
    """Download, verify and place pretrained inputs; print the flags that pass them."""

    names: Annotated[Positional[tuple[str, ...]], arg(metavar="[NAME ...]")] = ()
    """Entries to fetch (`list` shows them); none: every entry that is not gated."""
    to: str = DEFAULT_DIR
    """Folder the files go to (created; a leading `~` is expanded); the layout matches the flags printed at the
    end."""
    recheck: bool = False
    """Hash files that are already verified again instead of trusting their .verified.json record."""

    def __post_init__(self):
        for n in self.names:
            get_entry(n)


COMMANDS = {"list": ListConfig, "fetch": FetchConfig}


def run_list(cfg: ListConfig, entries: Iterable[Entry] | None = None) -> None:
    """Print the table of entries."""
    for e in ENTRIES if entries is None else entries:
        pin = f"sha256 {e.sha256}" if e.sha256 else ("revision " + e.revision + " (Hub LFS sha256 checked)")
        gated = "  [gated: named explicitly, needs a HF token]" if e.gated else ""
        print(f"{e.name:<17} {_fmt_size(e.size):>9}  {e.dest}{gated}\n{'':<29}{e.what}\n{'':<29}{e.origin}\n"
              f"{'':<29}{pin}")
        for line in flag_lines([(e, Path(DEFAULT_DIR) / e.dest)]):
            print(f"{'':<29}{line}")
        if cfg.verbose:
            print(f"{'':<29}source: {e.source}")


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.weights list|fetch ...`; returns the exit status (1 when a fetch failed)."""
    import tyro

    cfg = tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="python -m runtime.weights", args=argv,
                                               description=__doc__.split("\n\n")[0],
                                               config=(tyro.conf.FlagCreatePairsOff,))
    if isinstance(cfg, ListConfig):
        run_list(cfg)
        return 0
    result = fetch(cfg.names, cfg.to, recheck=cfg.recheck)
    if result.done:
        print("\nflags for the files in place:")
        for line in flag_lines(result.done):
            print("  " + line)
    if result.failed:
        print(f"\n{len(result.failed)} failed:", file=sys.stderr)
        for e, msg in result.failed:
            print(f"  {e.name}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
