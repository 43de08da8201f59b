"""Faithful small copies of the public text release: DCLM-baseline-1.0 as it is on the hub.

The release lays its files out as
    global-shard_NN_of_10/local-shard_M_of_10/shard_XXXXXXXX_processed.jsonl.zst
with gaps in the shard numbering, zstd-compressed JSONL rows with the full schema below (only
`text` is used; some rows carry `"text": null`).
"""
from __future__ import annotations

import json
from pathlib import Path

DCLM_FILES = (  # note the gaps: 00000001 is absent in local-shard_0, numbering restarts per folder
    "global-shard_01_of_10/local-shard_0_of_10/shard_00000000_processed.jsonl.zst",
    "global-shard_01_of_10/local-shard_0_of_10/shard_00000002_processed.jsonl.zst",
    "global-shard_01_of_10/local-shard_1_of_10/shard_00000000_processed.jsonl.zst",
)
SENTENCES = ("The quick brown fox jumps over the lazy dog near the river bank.",
             "Solar panels convert sunlight into electricity using photovoltaic cells.",
             "A recipe for bread needs flour, water, salt and a little yeast.",
             "The museum opens at nine and closes at five on weekdays.")


def dclm_row(i: int, text: str | None) -> dict:
    """One row with the release's schema."""
    return {
        "bff_contained_ngram_count_before_dedup": 0,
        "language_id_whole_page_fasttext": {"en": 0.93},
        "metadata": {"Content-Length": "12345", "Content-Type": "application/http; msgtype=response",
                     "WARC-Block-Digest": "sha1:ABC", "WARC-Concurrent-To": f"<urn:uuid:{i:08d}>",
                     "WARC-Date": "2023-01-27T05:54:46Z", "WARC-IP-Address": "192.0.2.1",
                     "WARC-Identified-Payload-Type": "text/html", "WARC-Payload-Digest": "sha1:DEF",
                     "WARC-Record-ID": f"<urn:uuid:r{i:08d}>", "WARC-Target-URI": f"https://example.org/{i}",
                     "WARC-Truncated": None, "WARC-Type": "response", "WARC-Warcinfo-ID": "<urn:uuid:w>"},
        "previous_word_count": 0 if text is None else len(text.split()),
        "text": text,
        "url": f"https://example.org/{i}",
        "warcinfo": "isPartOf: CC-MAIN-2023-06\r\npublisher: Common Crawl\r\n",
        "fasttext_openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train_prob": 0.02,
    }


def write_dclm(root: Path, docs_per_file: int = 12, null_every: int = 5) -> list[Path]:
    """root/global-shard_.../shard_..._processed.jsonl.zst; every `null_every`-th row has text null.
    Returns the files in sorted path order."""
    import zstandard

    out, i = [], 0
    for rel in DCLM_FILES:
        rows = []
        for _ in range(docs_per_file):
            text = None if null_every and i % null_every == null_every - 1 else \
                " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3))
            rows.append(json.dumps(dclm_row(i, text)))
            i += 1
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(("\n".join(rows) + "\n").encode()))
        out.append(path)
    return sorted(out)
