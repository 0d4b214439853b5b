"""Perplexity of a causal LM on a token stream, in non-overlapping windows (the usual WikiText protocol)."""
from __future__ import annotations

import math

import torch

from .progress import progress


def tokenize(tokenizer, text: str, n_tokens: int | None = None) -> torch.Tensor:
    """1-D token ids of ``text`` (no special tokens), truncated to ``n_tokens``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if n_tokens is not None:
        if ids.numel() < n_tokens:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than the {n_tokens} asked for")
        ids = ids[:n_tokens]
    return ids


def windows(ids: torch.Tensor, window: int) -> torch.Tensor:
    """[n_windows, window]; a last partial window is dropped so every window has the full context."""
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of {window}")
    return ids[: n * window].reshape(n, window)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 1024, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows; each window predicts its tokens 2..window."""
    total_nll, count = 0.0, 0
    for row in progress(windows(ids, window), desc):
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")
        total_nll += float(nll)
        count += row.numel() - 1
    return math.exp(total_nll / count)
