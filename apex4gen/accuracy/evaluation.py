"""Perplexity of a causal LM on a token stream, in non-overlapping windows (the usual WikiText protocol), the
eval's own noise (a bootstrap over those windows) and the seeded choice of calibration windows."""
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


def sample_windows(ids: torch.Tensor, samples: int, window: int, seed: int) -> torch.Tensor:
    """[samples, window]: distinct non-overlapping windows of ``ids`` drawn at random by ``seed``. The rows come
    in draw order, so a larger ``samples`` with the same seed starts with the rows of a smaller one."""
    rows = windows(ids, window)
    if samples > rows.shape[0]:
        raise ValueError(f"{ids.numel()} tokens hold {rows.shape[0]} windows of {window}, fewer than the "
                         f"{samples} asked for")
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]
    return rows[pick]


@torch.no_grad()
def window_nlls(model, ids: torch.Tensor, window: int = 1024, desc: str = "perplexity") -> torch.Tensor:
    """float64 [n_windows]: the mean next-token NLL of each window (it predicts its tokens 2..window)."""
    nlls = []
    for row in progress(windows(ids, window), desc):
        logits = model(input_ids=row.unsqueeze(0), use_cache=False).logits[0, :-1].float()
        nlls.append(float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum")) / (row.numel() - 1))
    return torch.tensor(nlls, dtype=torch.float64)


def perplexity_of(nlls: torch.Tensor) -> float:
    """exp(mean NLL) over windows of equal length: the perplexity of all their tokens together."""
    return math.exp(float(nlls.mean()))


def perplexity(model, ids: torch.Tensor, window: int = 1024, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over all windows."""
    return perplexity_of(window_nlls(model, ids, window, desc))


def bootstrap_ratio(fp_nlls: torch.Tensor, quant_nlls: torch.Tensor, resamples: int = 10000,
                    seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of quant_ppl / fp_ppl over windows resampled with replacement, both models
    on the same resampled windows: how far the ratio moves with which text is evaluated, which no calibration
    or method choice controls."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, fp_nlls.numel(), (resamples, fp_nlls.numel()), generator=gen)
    ratios = torch.exp(quant_nlls[idx].mean(1) - fp_nlls[idx].mean(1))
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)
