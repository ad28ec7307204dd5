"""Phase 1 trains only the rows of the input embedding that the training data uses.

Why: 96M of multilingual-e5-small's 118M parameters are its 250k-row embedding matrix, yet a corpus uses a
few thousand rows. A row no batch contains gets an exactly zero gradient, so AdamW without weight decay
never moves it (its moments stay zero), and clipping sees no contribution from it. Training a
``len(rows) x hidden`` delta instead of the whole matrix is therefore the same optimisation -- up to float
rounding, because the delta is added to the frozen rows rather than accumulated into them -- without a dense
250k-row gradient, dense optimizer state and a dense AdamW update every step. At the end the delta is
folded into the matrix, so the delta, the mask and the vector are in full-vocabulary coordinates as before.

For masked-LM data the random replacement tokens are drawn from the corpus's own tokens (``MLMCollator``),
so no batch ever holds a row outside the set.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def mask_tokens(input_ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int | torch.Tensor,
                gen: torch.Generator | None, probability: float = 0.15,
                replace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking with an explicit generator (reproducible): ``probability`` of the non-special tokens
    become targets; of those 80 % <mask>, 10 % a random token (from ``range(vocab)``, or from ``vocab`` when
    it is a tensor of ids), 10 % unchanged (``replace=False``: all <mask>, for scoring). Returns (inputs,
    labels with -100 where no target)."""
    ids = input_ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < probability) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    if not replace:
        ids[chosen] = mask_id
        return ids, labels
    r = torch.rand(ids.shape, generator=gen)
    ids[chosen & (r < 0.8)] = mask_id
    rand = chosen & (r >= 0.8) & (r < 0.9)
    if isinstance(vocab, torch.Tensor):  # (an empty set of ids: the token stays as it is)
        if len(vocab):
            ids[rand] = vocab[torch.randint(len(vocab), (int(rand.sum()),), generator=gen)]
    else:
        ids[rand] = torch.randint(vocab, (int(rand.sum()),), generator=gen)
    return ids, labels



def used_rows(rows: Iterable[dict], tokenizer) -> torch.Tensor:
    """Sorted token ids the examples use, plus the tokenizer's special tokens."""
    seen = set(tokenizer.all_special_ids)
    for row in rows:
        seen.update(row["input_ids"])
    return torch.tensor(sorted(seen), dtype=torch.long)


class MLMCollator:
    """Pads a batch and masks it the BERT way (15 % targets: 80 % <mask>, 10 % random, 10 % kept), with
    random tokens drawn from ``candidates`` (the corpus's ids) and the global RNG (seeded by Trainer)."""

    def __init__(self, tokenizer, mlm_probability: float, candidates: torch.Tensor):
        self.tokenizer, self.probability = tokenizer, mlm_probability
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.candidates = candidates[~torch.isin(candidates, self.special)]

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.tokenizer.pad([{k: e[k] for k in e if k != "labels"} for e in examples], return_tensors="pt")
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special) | (batch["attention_mask"] == 0)
        batch["input_ids"], batch["labels"] = mask_tokens(ids, special, self.tokenizer.mask_token_id,
                                                          self.candidates, None, self.probability)
        return batch


@contextlib.contextmanager
def train_rows_only(embedding: nn.Embedding, rows: torch.Tensor) -> Iterator[nn.Parameter]:
    """Freeze ``embedding.weight`` and train a delta over ``rows`` instead (registered on the module as
    ``row_delta``, so Trainer's optimizer and checkpoints see it); fold it in on exit."""
    weight = embedding.weight
    was = weight.requires_grad
    remap = torch.full((weight.shape[0],), len(rows), dtype=torch.long, device=weight.device)
    remap[rows.to(weight.device)] = torch.arange(len(rows), device=weight.device)
    delta = nn.Parameter(torch.zeros(len(rows), weight.shape[1], dtype=weight.dtype, device=weight.device))
    zero = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    embedding.register_parameter("row_delta", delta)
    hook = embedding.register_forward_hook(
        lambda module, args, out: out + F.embedding(remap[args[0]], torch.cat([module.row_delta, zero])))
    weight.requires_grad_(False)
    try:
        yield delta
    finally:
        hook.remove()
        del embedding.row_delta
        with torch.no_grad():
            weight.index_add_(0, rows.to(weight.device), delta.detach())
        weight.requires_grad_(was)
