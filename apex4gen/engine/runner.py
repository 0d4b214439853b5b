"""Running a :class:`Decoder`: greedy decode steps, eager or as CUDA-graph replays (one graph per batch size), and
greedy generation.

A captured step reads its tokens and position from static device tensors and leaves the greedy next tokens in
the token tensor and the position advanced, so steps replay back to back without the host in between.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpecError
from .cache import KVCache
from .model import Decoder


class DecodeStep:
    """One greedy decode step for ``batch`` sequences over ``cache`` (eager, or captured once and replayed)."""

    def __init__(self, model: Decoder, cache: KVCache, batch: int, graph: bool) -> None:
        self.model, self.cache = model, cache.narrow(batch)
        device = cache.k.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph = self._capture() if graph else None

    def _body(self) -> None:
        self.logits = self.model(self.tokens, self.cache, self.pos)
        self.tokens.copy_(self.logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (lazy initialisation stays out of the graph), then capture. The warm-up step
        runs at the cache's last position, which any step reaching it writes before reading, so capturing
        changes nothing a later step sees; tokens and position are restored."""
        saved = (self.tokens.clone(), self.pos.clone())
        self.pos.fill_(self.cache.length - 1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body()
        self.tokens.copy_(saved[0])
        self.pos.copy_(saved[1])
        return graph

    def start(self, tokens: torch.Tensor, pos: int) -> None:
        """Next step reads ``tokens`` [batch, 1] at position ``pos``."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)

    def __call__(self) -> torch.Tensor:
        """Run one step; returns the greedy next tokens [batch, 1] (the static tensor: copy to keep)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        return self.tokens


@dataclass(frozen=True)
class Generation:
    tokens: torch.Tensor   # [batch, new] greedy tokens after the prompt
    prompt_logits: torch.Tensor  # [batch, vocab] logits of the prompt's last position


@torch.no_grad()
def generate(model: Decoder, prompt: torch.Tensor, new_tokens: int, graph: bool = False) -> Generation:
    """Greedy generation: prefill the prompt [batch, T], then ``new_tokens`` - 1 decode steps."""
    batch, length = prompt.shape
    if length + new_tokens > model.rope.cos.shape[0]:
        raise SpecError(f"{length} prompt tokens + {new_tokens} new ones exceed the model's "
                        f"{model.rope.cos.shape[0]} positions; ask for fewer tokens")
    cache = KVCache.allocate(model.config, batch, length + new_tokens, prompt.device)
    logits = model(prompt, cache)[:, -1]
    step = DecodeStep(model, cache, batch, graph)
    first = logits.argmax(-1, keepdim=True)
    step.start(first, length)
    out = [first]
    for _ in range(new_tokens - 1):
        out.append(step().clone())
    return Generation(torch.cat(out, 1), logits)
