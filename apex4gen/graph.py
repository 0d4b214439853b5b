"""The model graph: one decoder layer's ops and activation tensors, as a networkx DiGraph.

Nodes are named and carry ``kind`` = ``"op"`` or ``"tensor"``; edges run tensor -> op -> tensor. Linear ops
carry ``n`` (output features), ``k`` (input features) and ``kind_name`` (the fused layer kind the accuracy
budget speaks of: q/k/v_proj belong to qkv_proj, gate/up_proj to gate_up_proj).

Two facts the planner needs come from the graph:

* GEMMs that read the same activation tensor share its granularity and compute path, because activations are
  quantized once per tensor (:func:`activation_groups`).
* Every decoder layer of a model has the same graph, so each linear layer's GEMM is one problem run
  ``num_layers`` times; equal (N, K) across layer kinds (q_proj and o_proj on Llama-2-7B) are one problem too
  (:func:`shared_problems`), so one kernel serves them all.

``fused=True`` builds the layer as serving engines run it (one qkv_proj GEMM, one gate_up_proj GEMM);
``fused=False`` builds the checkpoint's separate q/k/v and gate/up projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from .specs import ModelSpec

FUSED_KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Linear:
    name: str
    kind_name: str      # the fused kind, see the module docstring
    n: int
    k: int
    activation: str     # the tensor it reads


@dataclass(frozen=True)
class ActivationGroup:
    """The linear layers reading one activation tensor: one granularity and one path for all of them."""

    activation: str
    kind_name: str
    linears: tuple[Linear, ...]


@dataclass(frozen=True)
class Problem:
    """One GEMM weight shape and every linear layer kind that runs it; ``count`` GEMMs per forward pass."""

    n: int
    k: int
    layers: tuple[str, ...]
    count: int


def _add_op(g: nx.DiGraph, name: str, op: str, inputs: tuple[str, ...], outputs: tuple[str, ...], **attrs) -> None:
    g.add_node(name, kind="op", op=op, **attrs)
    for t in inputs + outputs:
        g.add_node(t, kind="tensor")
    g.add_edges_from((t, name) for t in inputs)
    g.add_edges_from((name, t) for t in outputs)


def _linear(g: nx.DiGraph, name: str, kind_name: str, n: int, k: int, x: str, y: str) -> None:
    _add_op(g, name, "linear", (x,), (y,), n=n, k=k, kind_name=kind_name)


def _attention_block(g: nx.DiGraph, m: ModelSpec, fused: bool) -> None:
    h = m.hidden_size
    _add_op(g, "input_norm", "rmsnorm", ("x",), ("attn_in",))
    if fused:
        _linear(g, "qkv_proj", "qkv_proj", m.q_dim + 2 * m.kv_dim, h, "attn_in", "qkv")
        qkv: tuple[str, ...] = ("qkv",)
    else:
        for proj, n in (("q_proj", m.q_dim), ("k_proj", m.kv_dim), ("v_proj", m.kv_dim)):
            _linear(g, proj, "qkv_proj", n, h, "attn_in", proj[0])
        qkv = ("q", "k", "v")
    _add_op(g, "attention", "attention", qkv, ("attn_out",))
    _linear(g, "o_proj", "o_proj", h, m.q_dim, "attn_out", "o")
    _add_op(g, "attn_residual", "add", ("x", "o"), ("x_mid",))


def _mlp_block(g: nx.DiGraph, m: ModelSpec, fused: bool) -> None:
    h, inter = m.hidden_size, m.intermediate_size
    _add_op(g, "post_norm", "rmsnorm", ("x_mid",), ("mlp_in",))
    if fused:
        _linear(g, "gate_up_proj", "gate_up_proj", 2 * inter, h, "mlp_in", "gate_up")
        gate_up: tuple[str, ...] = ("gate_up",)
    else:
        _linear(g, "gate_proj", "gate_up_proj", inter, h, "mlp_in", "gate")
        _linear(g, "up_proj", "gate_up_proj", inter, h, "mlp_in", "up")
        gate_up = ("gate", "up")
    _add_op(g, "silu_mul", "silu_mul", gate_up, ("mlp_act",))
    _linear(g, "down_proj", "down_proj", h, inter, "mlp_act", "mlp_out")
    _add_op(g, "mlp_residual", "add", ("x_mid", "mlp_out"), ("y",))


def layer_graph(model: ModelSpec, fused: bool = True) -> nx.DiGraph:
    g = nx.DiGraph(model=model.name, fused=fused)
    _attention_block(g, model, fused)
    _mlp_block(g, model, fused)
    return g


def linear_layers(g: nx.DiGraph) -> tuple[Linear, ...]:
    """Linear ops in execution order; ties broken by insertion order, so q, k, v keep their usual order."""
    order = {node: i for i, node in enumerate(g.nodes)}
    out = []
    for node in nx.lexicographical_topological_sort(g, key=order.__getitem__):
        attrs = g.nodes[node]
        if attrs["kind"] == "op" and attrs["op"] == "linear":
            (x,) = g.predecessors(node)
            out.append(Linear(node, attrs["kind_name"], attrs["n"], attrs["k"], x))
    return tuple(out)


def activation_groups(g: nx.DiGraph) -> tuple[ActivationGroup, ...]:
    groups: dict[str, list[Linear]] = {}
    for lin in linear_layers(g):
        groups.setdefault(lin.activation, []).append(lin)
    return tuple(ActivationGroup(act, lins[0].kind_name, tuple(lins)) for act, lins in groups.items())


def shared_problems(model: ModelSpec, fused: bool = True) -> tuple[Problem, ...]:
    """Distinct (N, K) GEMM problems of the whole model's decoder, sorted by (N, K)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for lin in linear_layers(layer_graph(model, fused)):
        by_shape.setdefault((lin.n, lin.k), []).append(lin.name)
    return tuple(Problem(n, k, tuple(names), len(names) * model.num_layers)
                 for (n, k), names in sorted(by_shape.items()))
