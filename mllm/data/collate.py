"""Samples -> model batches: expand image placeholders, pad or pack, build the image tensors.

A `Sample` is one templated training or prompt sequence: token ids with one IMAGE_TOKEN_INDEX per
image, labels of the same length (-100 = unsupervised), and the images' codes in placeholder order.
`collate` produces the batch contract documented in `mllm.modeling.modeling`:
    padded (one sample per row, right or left padding, attention_mask) or
    packed (several samples per row, position ids restart per sample, attention_mask None;
            transformers turns restarting position ids into a block-diagonal causal mask under SDPA,
            and the model gives flash-attention the sequence bounds of all rows (`packed_flash_kwargs`),
            so samples never attend to each other; each sample's
            first label is -100, as HF's DataCollatorWithFlattening, so no token predicts across
            samples and the loss equals the unpacked one).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mllm.modeling.configuration import IMAGE_TOKEN_INDEX


@dataclass
class Sample:
    """One sequence before image expansion."""

    input_ids: list[int]
    """Token ids; each IMAGE_TOKEN_INDEX stands for one image."""
    labels: list[int]
    """Targets aligned with input_ids (-100 = not supervised); placeholders must be -100."""
    images: list[np.ndarray | torch.Tensor] = field(default_factory=list)
    """Codes (K, h, w) per placeholder, in order."""
    image_gen: list[bool] = field(default_factory=list)
    """Per image: supervised by the depth head (text-to-image)."""

    def __post_init__(self):
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")
        n = sum(1 for t in self.input_ids if t == IMAGE_TOKEN_INDEX)
        if n != len(self.images):
            raise ValueError(f"sample has {n} image placeholders but {len(self.images)} images")
        if not self.image_gen:
            self.image_gen = [False] * n
        if len(self.image_gen) != n:
            raise ValueError("image_gen must have one flag per image")

    def expanded_length(self) -> int:
        """Length after each placeholder becomes h*w positions."""
        extra = sum(int(np.prod(img.shape[-2:])) - 1 for img in self.images)
        return len(self.input_ids) + extra


def _expand(sample: Sample, pad_id: int):
    """-> ids, labels, [(offset, codes (K, L), gen)] with each placeholder replaced by L positions."""
    ids, labels, images = [], [], []
    it = iter(zip(sample.images, sample.image_gen))
    for tok, lab in zip(sample.input_ids, sample.labels):
        if tok == IMAGE_TOKEN_INDEX:
            codes, gen = next(it)
            codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
            codes = codes.reshape(codes.shape[0], -1)  # (K, L)
            images.append((len(ids), codes, gen))
            ids.extend([pad_id] * codes.shape[1])
            labels.extend([-100] * codes.shape[1])
        else:
            ids.append(tok)
            labels.append(lab)
    return ids, labels, images


def collate(samples: list[Sample], pad_id: int = 0, padding_side: str = "right",
            pack_to: int | None = None, pad_to_multiple: int = 1) -> dict[str, torch.Tensor | None]:
    """Build a model batch. `pack_to=T` packs samples greedily (in order) into rows of length T."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    expanded = [_expand(s, pad_id) for s in samples]
    rows: list[list[int]] = []  # sample indices per row
    if pack_to is None:
        rows = [[i] for i in range(len(samples))]
    else:
        cur, cur_len = [], 0
        for i, (ids, _, _) in enumerate(expanded):
            if len(ids) > pack_to:
                raise ValueError(f"sample of {len(ids)} positions does not fit a packed row of {pack_to}")
            if cur and cur_len + len(ids) > pack_to:
                rows.append(cur)
                cur, cur_len = [], 0
            cur.append(i)
            cur_len += len(ids)
        rows.append(cur)
    lengths = [sum(len(expanded[i][0]) for i in r) for r in rows]
    T = pack_to if pack_to is not None else max(lengths)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    codes, lens, starts, gens = [], [], [], []
    for b, r in enumerate(rows):
        shift = T - lengths[b] if (padding_side == "left" and pack_to is None) else 0
        pos = shift
        for i in r:
            ids, labs, imgs = expanded[i]
            n = len(ids)
            input_ids[b, pos:pos + n] = torch.tensor(ids)
            labels[b, pos:pos + n] = torch.tensor(labs)
            # The loss pairs position t with label t + 1, so a sample's first label would be the target of
            # what precedes it: the previous sample's last token when packed (a text window's first label is a
            # mid-document token), a pad when left-padded. At the start of a row it is never a target.
            labels[b, pos] = -100
            attention_mask[b, pos:pos + n] = 1
            position_ids[b, pos:pos + n] = torch.arange(n)
            for off, c, g in imgs:
                codes.append(c)
                lens.append(c.shape[1])
                starts.append((b, pos + off))
                gens.append(g)
            pos += n
        if pack_to is not None and pos < T:  # trailing padding: its own (unsupervised) segment
            position_ids[b, pos:] = torch.arange(T - pos)
    K = codes[0].shape[0] if codes else 0
    Lmax = max(lens) if lens else 0
    image_codes = torch.zeros(len(codes), K, Lmax, dtype=torch.long)
    for j, c in enumerate(codes):
        image_codes[j, :, :c.shape[1]] = c
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": None if pack_to is not None else attention_mask,
        "position_ids": position_ids,
        "image_codes": image_codes,
        "image_lens": torch.tensor(lens, dtype=torch.long),
        "image_starts": torch.tensor(starts, dtype=torch.long).reshape(-1, 2),
        "image_gen": torch.tensor(gens, dtype=torch.bool),
        "num_samples": torch.tensor(len(samples)),
        "pad_ratio": torch.tensor(1.0 - sum(lengths) / float(B * T)),
    }
