"""Tensor parallel Gemma 4 (every variant: E2B/E4B per-layer inputs and KV sharing, 12B, 26B-A4B MoE, 31B k_eq_v).

As mlx-lm shards its models (llama.py `shard`), per decoder layer: q_proj all-to-sharded by heads, k/v_proj
by K/V heads, o_proj sharded-to-all (one all-sum); gate/up all-to-sharded, down sharded-to-all (one
all-sum); MoE experts split across ranks (experts.py, one more all-sum). Embeddings, the per-layer-input
table and the head are vocabulary-sharded (vocab.py). Norms, the router and the per-layer-input gates stay
replicated (small). After each all-sum every rank holds the same sums, so every rank computes the same
logits; they may differ from one process's in the last bits (the sum runs in another order).

K/V heads: with n_kv divisible by N a rank holds n_kv / N; with fewer K/V heads than ranks (E2B: 1) each rank
holds the one its query heads read, replicated over N / n_kv ranks. KV-shared layers read their producer's
local heads, which are the ones their own query heads need. An MTP drafter reads those caches, so its
attention is sharded the same way whenever a rank holds only part of the K/V (`shard_drafter`).
Knows mlx-lm's Gemma 4 blocks by their parts; nothing of caches or decoding.
"""

from typing import Tuple

import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from ..errors import DistributedError
from .experts import check_experts, shard_experts
from .slicing import take_rows
from .vocab import row_range, shard_embedding, shard_head


def kv_heads(n_kv: int, group) -> Tuple[int, int]:
    """The K/V heads [start, stop) rank `group.rank()` holds."""
    N, r = group.size(), group.rank()
    if n_kv % N == 0:
        per = n_kv // N
        return r * per, (r + 1) * per
    if N % n_kv == 0:  # fewer K/V heads than ranks: each is replicated over N / n_kv ranks
        j = r * n_kv // N
        return j, j + 1
    raise DistributedError(f"{N} ranks cannot split {n_kv} K/V heads (neither divides the other); use a number of "
                           "ranks that does, or --pipeline")


def _in_features(linear: nn.Module) -> int:
    bits = getattr(linear, "bits", None)
    return linear["weight"].shape[1] * (32 // bits if bits else 1)


def _split_problem(linear: nn.Module, group, axis: str):
    """Why N ranks cannot share a linear's outputs (axis 'out') or inputs ('in') in whole rows and whole
    quantization groups, or None when they can."""
    N = group.size()
    n = linear["weight"].shape[0] if axis == "out" else _in_features(linear)
    group_size = getattr(linear, "group_size", None) if axis == "in" else None
    if n % N or (group_size and (n // N) % group_size):
        return f"{n} features" + (f" in whole {group_size}-wide quantization groups" if group_size else "")
    return None


def _check_split(linear: nn.Module, group, what: str, axis: str) -> None:
    problem = _split_problem(linear, group, axis)
    if problem:
        raise DistributedError(f"{group.size()} ranks cannot split {what} ({problem}); use a number of ranks that "
                               "does, or --pipeline")


def mlp_splits(layer: nn.Module, group) -> bool:
    """Whether N ranks can share the layer's dense MLP. The 26B-A4B's (2112 wide, 2% of its layer next to the
    experts) does not split into whole 64-wide groups over 2 ranks; a MoE layer then keeps it whole on every
    rank (no all-sum for it either)."""
    mlp = layer.mlp
    return not (_split_problem(mlp.gate_proj, group, "out") or _split_problem(mlp.down_proj, group, "in"))


def check_layer(layer: nn.Module, group) -> None:
    attn, N = layer.self_attn, group.size()
    if attn.n_heads % N:
        raise DistributedError(f"{N} ranks cannot split the {attn.n_heads} attention heads of layer {layer.layer_idx}; "
                               f"use a number of ranks that divides {attn.n_heads}, or --pipeline")
    kv_heads(attn.n_kv_heads, group)
    _check_split(attn.o_proj, group, f"layer {layer.layer_idx}'s attention output", "in")
    if not layer.enable_moe:  # a MoE layer's small dense MLP stays whole where it does not split (mlp_splits)
        _check_split(layer.mlp.gate_proj, group, f"layer {layer.layer_idx}'s MLP", "out")
        _check_split(layer.mlp.down_proj, group, f"layer {layer.layer_idx}'s MLP", "in")
    if layer.enable_moe:
        check_experts(layer.experts.switch_glu.gate_proj.num_experts, group)


def shard_attention(attn: nn.Module, group) -> None:
    start, stop = kv_heads(attn.n_kv_heads, group)
    attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
    for name in ("k_proj", "v_proj"):  # KV-shared layers have neither; k_eq_v layers no v_proj
        if name in attn:
            take_rows(attn[name], start * attn.head_dim, stop * attn.head_dim)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= group.size()
    attn.n_kv_heads = stop - start


def shard_layer(layer: nn.Module, group) -> None:
    shard_attention(layer.self_attn, group)
    mlp = layer.mlp
    if mlp_splits(layer, group):
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    if layer.enable_moe:
        shard_experts(layer.experts, layer.experts.switch_glu.gate_proj.num_experts, group)


def shard_text_model(model: nn.Module, group) -> str:
    """Shard a gemma4_text Model in place (everything checked before anything changes); returns what each
    rank holds, in words."""
    trunk, args = model.model, model.args
    for layer in model.layers:
        check_layer(layer, group)
    row_range(args.vocab_size, group, "the vocabulary")
    if trunk.hidden_size_per_layer_input:
        row_range(trunk.embed_tokens_per_layer["weight"].shape[0], group, "the per-layer-input table")
    held = describe(model, group)
    for layer in model.layers:
        shard_layer(layer, group)
    shard_embedding(trunk.embed_tokens, group, "the vocabulary")
    if trunk.hidden_size_per_layer_input:
        shard_embedding(trunk.embed_tokens_per_layer, group, "the per-layer-input table")
    if not args.tie_word_embeddings:
        shard_head(model.lm_head, group)
    return held


def describe(model: nn.Module, group) -> str:
    N, args, layers = group.size(), model.args, model.layers
    kv = {}
    for layer in layers:
        attn = layer.self_attn
        start, stop = kv_heads(attn.n_kv_heads, group)
        kv[layer.layer_type.split("_")[0]] = f"{stop - start} of {attn.n_kv_heads}" + (
            " (replicated)" if stop - start == attn.n_kv_heads else "")
    mlp = f"1/{N} of each MLP" if all(mlp_splits(layer, group) for layer in layers) else \
        "the dense MLP whole (it does not split into whole quantization groups)"
    moe = f", {args.num_experts // N} of {args.num_experts} experts" if args.enable_moe_block else ""
    ple = " and per-layer inputs" if args.hidden_size_per_layer_input else ""
    return (f"each rank holds {args.num_attention_heads // N} of {args.num_attention_heads} query heads, K/V heads "
            f"{', '.join(f'{t} {d}' for t, d in kv.items())}, {mlp}{moe}, 1/{N} of the vocabulary "
            f"(embeddings{ple}, head)")


def shard_drafter(drafter: nn.Module, base, group) -> bool:
    """An MTP assistant for a tensor-sharded `base`, in place: where a rank's base caches hold only part of the
    K/V heads the drafter reads, its query heads and o_proj are sharded as the base's, so each rank's drafter
    reads exactly the heads its caches hold; otherwise it stays whole (replicated, no collective). Returns
    whether it was sharded."""
    N = group.size()
    partial = [layer for layer in drafter.layers
               if base.attention_geometry(layer.layer_type)[1] != layer.self_attn.n_kv_heads]
    if not partial:
        return False
    for layer in drafter.layers:
        attn = layer.self_attn
        if attn.n_heads % N:
            raise DistributedError(f"{N} ranks cannot split the drafter's {attn.n_heads} attention heads; use a "
                                   f"number of ranks that divides {attn.n_heads}, or --pipeline")
        kv_heads(attn.n_kv_heads, group)
        _check_split(attn.o_proj, group, "the drafter's attention output", "in")
    for layer in drafter.layers:
        shard_attention(layer.self_attn, group)
    return True
