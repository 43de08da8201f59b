"""Templates: raw text + image codes -> `Sample`s with LLaVA-style loss masks (REFERENCE 6.6-6.8).

Layouts (before image expansion; [IMG] is one IMAGE_TOKEN_INDEX, expanded to h*w positions later):
    text      bos text eos                                                   all supervised
    T2I       bos caption " Generate an image based on this description." boi [IMG] eoi eos
                                                                             boi, eoi, eos (text CE);
                                                                             [IMG] via the depth head
    null T2I  bos "<unconditional>" boi [IMG] eoi eos                        same (CFG caption dropout)
    caption   bos boi [IMG] eoi caption eos                                  caption + eos
    plain     bos [IMG] caption "\\n"                                         caption + "\\n"
    vicuna_v1 bos "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."           each " {a}</s>"

How turn boundaries are tokenised (and why masks are exact token by token):
  1. The conversation is rendered to ONE string (exactly LLaVA's `get_prompt()`), and the character
     spans to supervise are recorded while rendering: for an assistant turn, from right after
     "ASSISTANT:" to the end of its "</s>".
  2. The string is split at "<image>" (as LLaVA's `tokenizer_image_token`); each chunk is tokenised
     whole, without special tokens, with the fast tokenizer's offset mapping. Chunks are joined with
     IMAGE_TOKEN_INDEX and one bos is put in front.
  3. A token is supervised iff its character range overlaps a supervised span (a zero-width token:
     iff its start lies inside one). sentencepiece pieces never cross whitespace, so ":" and the
     reply's first piece ("\u2581A", which carries the separating space) are separate tokens and the
     boundary is exact; "</s>" inside the string becomes the eos id (a special token). A message that
     holds such a string itself is refused (`check_no_special_text`); documents, captions and prompts
     are tokenised with special-token strings as plain characters (`encode_plain`).
  The ids are therefore identical to LLaVA's (whole-chunk tokenisation), while the masks come from
  character offsets instead of LLaVA's per-round length arithmetic (its "-2" off-by-ones that change
  with the tokenizer's legacy flag). Generation prompts (`chat_prompt`) render the same string up
  to "ASSISTANT:", so their ids are a prefix of the training ids.

boi and eoi are appended as ids, chosen per text tokenizer by `image_marker_ids` and recorded in the
model config: for a Llama-2 (or Mistral) sentencepiece tokenizer the byte pieces <0x00>/<0x01> (3/4,
the release's), so `t2i_prompt_ids` equals tokenising `prompt + suffix + "\\x00"` as the release does;
for a Llama-3 tokenizer, whose ids 3/4 are ordinary text, its first two reserved special tokens.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from mllm.data.collate import Sample
from mllm.modeling.configuration import IMAGE_TOKEN_INDEX

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
T2I_SUFFIX = " Generate an image based on this description."
NULL_PROMPT = "<unconditional>"
BOI_TOKEN_ID = 3  # the release's boi: Llama-2 byte piece <0x00>, UniMLLMConfig.boi_token_id's default
EOI_TOKEN_ID = 4  # <0x01>, UniMLLMConfig.eoi_token_id's default
BYTE_MARKERS = ("<0x00>", "<0x01>")  # sentencepiece byte-fallback pieces (Llama-2, Mistral)
RESERVED_MARKER = re.compile(r"<\|reserved_special_token_(\d+)\|>")  # Llama-3's reserved special tokens
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
SYSTEM_ROLES = ("system",)


@dataclass(frozen=True)
class ConversationTemplate:
    """A LLaVA conversation format (separator style TWO for vicuna_v1, PLAIN for plain)."""

    name: str
    """Template name used in recipes."""
    system: str
    """System prompt put before the first turn."""
    roles: tuple[str, str]
    """(user, assistant) role names as rendered."""
    sep: str
    """Separator after the system prompt and after user turns."""
    sep2: str
    """Separator after assistant turns; "</s>" stands for the text tokenizer's eos token (its id when encoded)."""


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions."),
    roles=("USER", "ASSISTANT"), sep=" ", sep2="</s>")
PLAIN = ConversationTemplate(name="plain", system="", roles=("", ""), sep="\n", sep2="\n")
TEMPLATES = {t.name: t for t in (PLAIN, VICUNA_V1)}


def get_template(name: str) -> ConversationTemplate:
    """Template by name; ValueError for unknown names."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ---- tokenisation -----------------------------------------------------------------------------
def special_ids(tokenizer) -> tuple[int, int]:
    """(bos, eos) ids of a HF tokenizer; ValueError if either is missing."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs bos and eos tokens (a Llama sentencepiece tokenizer has ids 1 and 2)")
    return bos, eos


def image_marker_ids(tokenizer) -> tuple[int, int]:
    """(boi, eoi) ids for a HF text tokenizer: the byte pieces <0x00>/<0x01> when "\\x00\\x01" encodes to
    them (Llama-2, Mistral: 3/4, as released), else the two lowest-numbered <|reserved_special_token_N|>
    (Llama-3: N = 0, 1); ValueError naming the tokenizer otherwise."""
    vocab = tokenizer.get_vocab()
    pieces = [vocab.get(t) for t in BYTE_MARKERS]
    if None not in pieces and encode(tokenizer, "\x00\x01")[-2:] == pieces:
        return pieces[0], pieces[1]
    reserved = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := RESERVED_MARKER.fullmatch(t)))
    if len(reserved) >= 2:
        return reserved[0][1], reserved[1][1]
    raise ValueError(f"no image marker tokens in the text tokenizer {tokenizer.name_or_path or '(unnamed)'}: looked "
                     f"for the sentencepiece byte pieces {' / '.join(BYTE_MARKERS)} (Llama-2, Mistral) and for two "
                     "<|reserved_special_token_N|> tokens (Llama-3)")


# transformers sets `split_special_tokens` on the shared Rust tokenizer before each encode: two threads (the web
# chat's) could tokenise a template's "</s>" as text, or a prompt's "</s>" as eos, in each other's setting
_TOKENIZE_LOCK = threading.Lock()


def _tokenize(tokenizer, text: str, **kw):
    """tokenizer(text) without special tokens; ValueError for text that is not valid Unicode."""
    try:
        with _TOKENIZE_LOCK:
            return tokenizer(text, add_special_tokens=False, **kw)
    except (TypeError, UnicodeError):
        # json.loads accepts lone surrogate escapes ("\ud83d", half an emoji in scraped data); the fast
        # tokenizer then raises a TypeError that names no cause. Callers skip ValueErrors per record.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode ({e.reason} at character {e.start}: "
                             f"{text[max(0, e.start - 20):e.start]!r})") from None
        raise


def encode(tokenizer, text: str) -> list[int]:
    """Plain ids of `text` (no bos/eos), tokenised whole; ValueError if `text` is not valid Unicode."""
    return list(_tokenize(tokenizer, text)["input_ids"])


_MARKER_BYTES = str.maketrans("", "", "\x00\x01")  # NUL / SOH: Llama-2's boi / eoi byte pieces <0x00> / <0x01>


def plain(text: str) -> str:
    """Data text without NUL and SOH, which Llama-2's tokenizer turns into the image markers boi / eoi (control
    characters that mean nothing in text)."""
    return text.translate(_MARKER_BYTES)


def encode_plain(tokenizer, text: str) -> list[int]:
    """Ids of data text (a document, a caption, a prompt) as plain text: the tokenizer's special-token
    strings ("<s>", "</s>" on Llama-2) are tokenised as characters and NUL / SOH are removed (`plain`), so
    no data can put bos, eos or an image marker inside a sample. Text without them gives `encode`'s ids."""
    return list(_tokenize(tokenizer, plain(text), split_special_tokens=True)["input_ids"])


def _special_text(tokenizer) -> str | None:
    """A regex of the tokenizer's added-token strings ("<s>", "</s>"), or None."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
    return "|".join(map(re.escape, added)) if added else None


def check_no_special_text(tokenizer, text: str) -> None:
    """ValueError when `text` holds one of the tokenizer's added-token strings ("</s>"): a rendered
    conversation is tokenised with them as control tokens (the template's own turn ends), so a message
    holding one would put an eos in the middle of a turn."""
    if (pattern := _special_text(tokenizer)) and (m := re.search(pattern, text)):
        raise ValueError(f"a message contains the text tokenizer's control token {m.group(0)!r}, which only the "
                         "template may place")


def drop_special_text(tokenizer, text: str) -> str:
    """`text` without the tokenizer's added-token strings: a model's reply may spell "</s>" out of ordinary
    pieces (explaining HTML), and kept in the history it would fail `check_no_special_text` every turn after."""
    return re.sub(pattern, "", text) if (pattern := _special_text(tokenizer)) else text


def encode_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]] = ()) -> tuple[list[int], list[bool]]:
    """`text` -> (ids, supervised flags); "<image>" becomes IMAGE_TOKEN_INDEX (never supervised).

    See the module docstring: chunks between placeholders are tokenised whole; a token is supervised
    iff its character range overlaps one of `spans` (character offsets into `text`). ValueError if
    `text` is not valid Unicode.
    """
    ids: list[int] = []
    flags: list[bool] = []
    start = 0
    chunks = text.split(IMAGE_PLACEHOLDER)
    for c, chunk in enumerate(chunks):
        if c > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            flags.append(False)
        if chunk:
            try:
                enc = _tokenize(tokenizer, chunk, return_offsets_mapping=True)
            except NotImplementedError:
                enc = {}
            if "offset_mapping" not in enc:
                raise ValueError("templates need a fast (tokenizers-backed) tokenizer that returns offset mappings")
            for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
                a, b = a + start, b + start
                if a == b:
                    sup = any(s <= a < e for s, e in spans)
                else:
                    sup = any(a < e and b > s for s, e in spans)
                ids.append(tok)
                flags.append(sup)
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, flags


def _codes(x) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"image codes must be (K, h, w), got shape {arr.shape}")
    return arr


# ---- text-to-image, caption, text ---------------------------------------------------------------
def t2i_prompt_ids(tokenizer, prompt: str, boi_id: int = BOI_TOKEN_ID) -> list[int]:
    """Generation prompt ids: bos + prompt + " Generate an image based on this description." + boi."""
    bos, _ = special_ids(tokenizer)
    return [bos] + encode_plain(tokenizer, plain(prompt).strip() + T2I_SUFFIX) + [boi_id]


def null_prompt_ids(tokenizer, boi_id: int = BOI_TOKEN_ID) -> list[int]:
    """The CFG null prompt: bos + "<unconditional>" + boi (ordinary pieces, no suffix; REFERENCE 6.9)."""
    bos, _ = special_ids(tokenizer)
    return [bos] + encode(tokenizer, NULL_PROMPT) + [boi_id]


def t2i_sample(tokenizer, caption: str | None, codes, boi_id: int = BOI_TOKEN_ID,
               eoi_id: int = EOI_TOKEN_ID) -> Sample:
    """Text-to-image sample; `caption=None` gives the null-prompt sample (caption dropout for CFG).

    Supervised as text: boi, eoi, eos. The image is flagged `image_gen` (depth-head targets).
    """
    _, eos = special_ids(tokenizer)
    prompt = null_prompt_ids(tokenizer, boi_id) if caption is None else t2i_prompt_ids(tokenizer, caption, boi_id)
    ids = prompt + [IMAGE_TOKEN_INDEX, eoi_id, eos]
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + [boi_id, IGNORE_INDEX, eoi_id, eos]
    return Sample(ids, labels, [_codes(codes)], [True])


def caption_sample(tokenizer, caption: str, codes, boi_id: int = BOI_TOKEN_ID,
                   eoi_id: int = EOI_TOKEN_ID) -> Sample:
    """Image-to-text sample: bos boi [IMG] eoi caption eos; caption + eos supervised."""
    bos, eos = special_ids(tokenizer)
    cap = encode_plain(tokenizer, plain(caption).strip()) + [eos]
    ids = [bos, boi_id, IMAGE_TOKEN_INDEX, eoi_id] + cap
    labels = [IGNORE_INDEX] * 4 + cap
    return Sample(ids, labels, [_codes(codes)], [False])


def shorten(tokenizer, text: str, n_tokens: int) -> str:
    """The first `n_tokens` tokens of data text `text` (as `encode_plain` tokenises it), as text."""
    text = plain(text)
    if n_tokens <= 0:
        return ""
    offsets = _tokenize(tokenizer, text, split_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    return text if n_tokens >= len(offsets) else text[:offsets[n_tokens - 1][1]]


def text_samples(tokenizer, text: str, max_len: int | None = None, overflow: str = "split") -> list[Sample]:
    """Pure text: bos text eos, every token supervised.

    Longer than `max_len`: "split" into windows of max_len tokens that overlap by one, so that each window's
    first token (which nothing in the window predicts) is the previous one's last and every token after bos
    is a target exactly once; "truncate" to the first window; "skip" -> [] (the caller counts it as over-long).
    """
    if overflow not in ("split", "truncate", "skip"):
        raise ValueError(f"overflow must be split, truncate or skip, got {overflow!r}")
    bos, eos = special_ids(tokenizer)
    ids = [bos] + encode_plain(tokenizer, text) + [eos]
    if max_len is None or len(ids) <= max_len:
        return [Sample(ids, list(ids))]
    if overflow == "skip":
        return []
    if overflow == "truncate":
        return [Sample(ids[:max_len], ids[:max_len])]
    if max_len < 2:
        raise ValueError(f"text_overflow split needs max_len >= 2, got {max_len}")
    return [Sample(ids[i:i + max_len], ids[i:i + max_len]) for i in range(0, len(ids) - 1, max_len - 1)]


# ---- conversations ---------------------------------------------------------------------------------
def normalize_conversation(conversations: Sequence[dict[str, Any]], num_images: int) -> list[tuple[str, str]]:
    """LLaVA JSON turns -> [(role "user"|"assistant", text)], alternating and starting with the user.

    Leading non-user turns (assistant, system) are dropped (as LLaVA; the template brings its own system
    prompt); a system turn later on is malformed. With one image, "<image>" is moved to the front of
    its turn as "<image>\\n" (LLaVA's preprocess_multimodal); with images but no placeholder, one
    "<image>\\n" per image is put in front of the first user turn. NUL and SOH are removed (`plain`).
    ValueError on malformed input.
    """
    turns: list[tuple[str, str]] = []
    for t in conversations:
        if not isinstance(t, dict) or not isinstance(t.get("value"), str):
            raise ValueError(f"each turn needs a string 'value', got {t!r:.80}")
        who = str(t.get("from", t.get("role", ""))).lower()
        if not turns and who in SYSTEM_ROLES:
            continue
        if who in USER_ROLES:
            role = "user"
        elif who in ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise ValueError(f"unknown conversation role {who!r}")
        if not turns and role != "user":
            continue
        if turns and turns[-1][0] == role:
            raise ValueError("conversation turns must alternate between user and assistant")
        turns.append((role, plain(t["value"])))
    if not turns:
        raise ValueError("conversation has no user turn")
    n = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if num_images == 1 and n == 1:
        turns = [(r, IMAGE_PLACEHOLDER + "\n" + v.replace(IMAGE_PLACEHOLDER, "").strip())
                 if IMAGE_PLACEHOLDER in v else (r, v) for r, v in turns]
    elif n == 0 and num_images > 0:
        turns[0] = (turns[0][0], (IMAGE_PLACEHOLDER + "\n") * num_images + turns[0][1])
    elif n != num_images:
        raise ValueError(f"conversation has {n} {IMAGE_PLACEHOLDER} placeholders but {num_images} images")
    return turns


def render(template: ConversationTemplate, turns: Sequence[tuple[str, str | None]],
           eos: str | None) -> tuple[str, list[tuple[int, int]]]:
    """Render turns to one string; returns (text, supervised character spans).

    A final assistant turn with text None renders as "ASSISTANT:" (the generation prompt). `eos`: the
    text tokenizer's eos token, which ends assistant turns in place of the template's "</s>" (Llama-2's
    eos; Llama-3 ends with "<|end_of_text|>", where "</s>" would be plain text).
    """
    if template.name == "plain":
        # LLaVA plain: the user turn is reduced to its image, the answer follows, then sep.
        if len(turns) != 2 or turns[1][1] is None:
            raise ValueError("the plain template takes exactly one (image, caption) exchange")
        if IMAGE_PLACEHOLDER not in turns[0][1]:
            raise ValueError("the plain template needs an image in the user turn")
        head = IMAGE_PLACEHOLDER * turns[0][1].count(IMAGE_PLACEHOLDER)
        text = head + turns[1][1] + template.sep
        return text, [(len(head), len(text))]
    user, assistant = template.roles
    sep2 = eos if eos and template.sep2 == "</s>" else template.sep2
    text = template.system + template.sep
    spans = []
    for role, msg in turns:
        name = user if role == "user" else assistant
        if msg is None:
            text += name + ":"
            continue
        if role == "user":
            text += f"{name}: {msg}{template.sep}"
        else:
            start = len(text) + len(name) + 1  # right after "ASSISTANT:"; the space goes with the reply
            text += f"{name}: {msg}{sep2}"
            spans.append((start, len(text)))
    return text, spans


def conversation_sample(tokenizer, conversations: Sequence[dict[str, Any]], images: Sequence = (),
                        template: str = "vicuna_v1") -> Sample:
    """LLaVA/Mini-Gemini conversation -> training Sample (assistant turns + their "</s>" supervised)."""
    bos, _ = special_ids(tokenizer)
    tpl = get_template(template)
    turns = normalize_conversation(conversations, len(images))
    for _, msg in turns:
        check_no_special_text(tokenizer, msg)
    if turns[-1][0] == "user":  # a trailing question without an answer teaches nothing
        turns = turns[:-1]
    if not turns:
        raise ValueError("conversation has no assistant answer")
    text, spans = render(tpl, turns, tokenizer.eos_token)
    ids, flags = encode_spans(tokenizer, text, spans)
    ids = [bos] + ids
    labels = [IGNORE_INDEX] + [t if f else IGNORE_INDEX for t, f in zip(ids[1:], flags)]
    return Sample(ids, labels, [_codes(c) for c in images], [False] * len(images))


def chat_prompt(tokenizer, turns: Sequence[str | dict[str, Any]], images: Sequence = (),
                template: str = "vicuna_v1") -> Sample:
    """Generation prompt ending with "ASSISTANT:" (vicuna_v1); labels all -100.

    `turns`: alternating strings (user, assistant, ..., user), or LLaVA dicts {"from", "value"}; the
    last turn must be the user's. `images`: codes (K, h, w) per "<image>" (prepended if absent).
    """
    bos, _ = special_ids(tokenizer)
    tpl = get_template(template)
    if tpl.name != "vicuna_v1":
        raise ValueError("chat prompts use the vicuna_v1 template")
    conv = [t if isinstance(t, dict) else {"from": "human" if i % 2 == 0 else "gpt", "value": t}
            for i, t in enumerate(turns)]
    norm = normalize_conversation(conv, len(images))
    for _, msg in norm:
        check_no_special_text(tokenizer, msg)
    if norm[-1][0] != "user":
        raise ValueError("the last turn of a chat prompt must be the user's")
    text, _ = render(tpl, list(norm) + [("assistant", None)], tokenizer.eos_token)
    ids, _ = encode_spans(tokenizer, text)
    ids = [bos] + ids
    return Sample(ids, [IGNORE_INDEX] * len(ids), [_codes(c) for c in images], [False] * len(images))
