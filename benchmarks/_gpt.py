"""A small decoder-only (GPT-style) byte-level language model in Flax NNX, and a LoRA baseline.

Used by ``benchmarks/transformer.py``. The model is the standard pre-norm transformer:

    h = embed(tokens) + pos[:L]
    h = h + attn(ln1(h), causal mask)      # nnx.MultiHeadAttention: q/k/v/out are LinearGeneral
    h = h + fc2(gelu(fc1(ln2(h))))         # nnx.Linear d -> 4d -> d
    logits = head(ln_f(h))                 # nnx.Linear d -> 256 (untied)

:class:`LoRA` wraps an ``nnx.Linear`` or ``nnx.LinearGeneral`` (matricised over its input and
output axis groups) as ``y = base(x) + (alpha / r) x A B`` with ``nnx.LoRA`` factors (``A``
he-uniform, ``B = 0``, both ``nnx.LoRAParam``), so training ``wrt=nnx.LoRAParam`` leaves the
pretrained weights frozen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dlrt_jax


@dataclass(frozen=True)
class GPTConfig:
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    context: int = 64
    mlp_ratio: int = 4
    vocab: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(cfg.n_heads, d, decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, cfg.mlp_ratio * d, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_ratio * d, d, rngs=rngs)

    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.fc2(nnx.gelu(self.fc1(self.ln2(h))))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        L = tokens.shape[-1]
        h = self.embed(tokens) + self.pos[:L]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.ln_f(h))


def cross_entropy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy in nats (bits per byte = this / ln 2)."""
    logits = model(x).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


# ---- LoRA baseline ----------------------------------------------------------------------------


def _in_out(layer: nnx.Module) -> tuple[int, int, int]:
    """``(n_in, n_out, k_in)`` of a Linear / LinearGeneral: flat sizes and number of input axes."""
    shape = layer.kernel.get_value().shape
    if isinstance(layer, nnx.LinearGeneral):
        axes = layer.axis if isinstance(layer.axis, tuple) else (layer.axis,)
        k = len(axes)
        if tuple(sorted(a % 64 for a in axes)) != tuple(range(64 - k, 64)):
            raise ValueError(f"LoRA: LinearGeneral must contract the trailing axes, got {axes}.")
    else:
        k = 1
    return math.prod(shape[:k]), math.prod(shape[k:]), k


class LoRA(nnx.Module):
    """``base(x) + (alpha / r) (x A) B`` for an ``nnx.Linear`` / ``nnx.LinearGeneral`` base."""

    def __init__(self, base: nnx.Module, rank: int, *, alpha: float | None = None, rngs: nnx.Rngs):
        self.base = base
        n_in, n_out, k = _in_out(base)
        self.k_in = k
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.lora = nnx.LoRA(n_in, rank, n_out, rngs=rngs)

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        y = self.base(x, **kwargs)  # MultiHeadAttention passes out_sharding=
        flat = x.reshape(x.shape[: x.ndim - self.k_in] + (-1,))
        return y + self.scale * self.lora(flat).reshape(y.shape)


ADAPTED = ("query", "key", "value", "out", "fc1", "fc2", "head")  # every adapted layer's name


def adapted(path: tuple, node) -> bool:
    """Whether ``node`` at ``path`` is an adapted layer: attention q/k/v/out, MLP, output head."""
    return (
        isinstance(node, nnx.Linear | nnx.LinearGeneral) and bool(path) and str(path[-1]) in ADAPTED
    )


def add_lora(model: nnx.Module, rank: int, *, seed: int = 0) -> nnx.Module:
    """A copy of ``model`` with every :func:`adapted` layer wrapped in :class:`LoRA`."""
    rngs = nnx.Rngs(seed)

    def wrap(path, node):
        return LoRA(node, rank, rngs=rngs) if adapted(path, node) else node

    return nnx.recursive_map(wrap, nnx.clone(model))


# ---- counting -----------------------------------------------------------------------------------


def count_params(tree) -> int:
    """Parameters of a pure state: arrays by size, ``LowRank`` factors at their active rank,
    ``r (n + m) + r^2`` (``U``, ``S``, ``V``)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=dlrt_jax.is_lowrank):
        if dlrt_jax.is_lowrank(leaf):
            n, m = leaf.shape
            r = int(leaf.active_rank)
            total += r * (n + m) + r * r
        else:
            total += int(np.size(leaf))
    return total


def tree_bytes(tree) -> int:
    """Bytes of every array in ``tree`` (stored sizes: capacity, not rank, for ``LowRank``)."""
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


#: ``{path: active rank}`` of the ``LowRank`` leaves of a pure state: the library's own helper.
lowrank_ranks = dlrt_jax.factor_ranks
