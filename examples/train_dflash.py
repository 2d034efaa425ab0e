"""Train a tiny DFlash block drafter for the trained tiny Gemma 4 base (tests/fixtures/gemma4-tiny-code).

    python examples/train_dflash.py --out /tmp/dflash [--steps 3000] [--sequences 2048]

What it does (for the fixture tests/fixtures/gemma4-tiny-code/dflash, on a busy 2-core CPU: the data took
~40 minutes, training ~55):
1. Data: windows of CPython's standard library (the source the base was trained on; its held-out
   prompts come from other packages, examples/measure/heldout.py), each continued greedily by the base, so
   the text is what speculative greedy decoding will be asked to draft; and, for variety (the greedy
   continuations repeat themselves, and 600 of them are learnt by heart within 500 steps), more windows
   of the library's own text, labelled with the base's greedy choice at every position. The base's layer
   outputs are captured once, while generating or labelling.
2. A z-lab-layout DFlash drafter (models/gemma4_dflash.py) as wide as the base, reading three of its
   layers. Training follows DFlash: random anchors per sequence; the block [x_a, mask, ...] at positions
   a.. attends to the base's features before a and to its own rows; row j learns the token at a+j, the
   base's greedy choice there (cross-entropy, weighted towards early rows). Every block gets a random length
   from 2 to the native size (masks past it are absent), so a block the cost model cuts short is an input
   the drafter has seen: attention in the block is bidirectional, a shorter block is a different input.
3. Checks that the batched training forward equals the inference path (context cache + one block) on one
   example, and saves config.json + model.safetensors in z-lab's layout (fp32).

Needs nothing but mlx_spec and its fixtures.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from mlx_spec import load
from mlx_spec.models import gemma4_dflash

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "tests/fixtures/gemma4-tiny-code/base"
STDLIB = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
PROMPT, LENGTH = 32, 256  # tokens of stdlib text, then greedy continuation up to LENGTH
MASK_TOKEN = 3  # <unk>: byte-level BPE never produces it
GAMMA = 4.0  # row weights exp(-(j-1)/GAMMA), as DFlash's training favours the first drafts


def drafter_config(base, block_size: int, layers: int, intermediate: int) -> dict:
    t = base.args
    return {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": t.hidden_size,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": t.hidden_size // 4, "vocab_size": t.vocab_size,
            "rms_norm_eps": 1e-6, "max_position_embeddings": t.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "block_size": block_size,
            "num_target_layers": t.num_hidden_layers, "layer_types": ["full_attention"] * layers,
            "final_logit_softcapping": t.final_logit_softcapping, "tie_word_embeddings": False, "dtype": "float32",
            "dflash_config": {"target_layer_ids": list(range(t.num_hidden_layers - 1)), "mask_token_id": MASK_TOKEN}}


# --- data -----------------------------------------------------------------------------------------

def windows(tokenizer, n: int, length: int, seed: int):
    """n random windows of `length` tokens of the standard library's source."""
    files = sorted(p for p in STDLIB.rglob("*.py") if not {"test", "tests", "idlelib"} & set(p.parts))
    rng = np.random.default_rng(seed)
    streams = []
    for p in files:
        ids = tokenizer.encode(p.read_text(errors="replace"))
        if len(ids) > length + 1:
            streams.append(ids)
    out = []
    while len(out) < n:
        ids = streams[rng.integers(len(streams))]
        s = int(rng.integers(0, len(ids) - length))
        out.append(ids[s : s + length])
    return np.array(out, np.int32)


def label_windows(base, ids: np.ndarray, layers, batch: int = 16):
    """(labels (N, LENGTH): the base's greedy choice for each position given the text before it (the token
    itself at position 0), features (N, LENGTH, n*H) float16) for windows of text."""
    labels, features = [], []
    for s in range(0, len(ids), batch):
        x = mx.array(ids[s : s + batch])
        logits, _, f = base.forward_layers(x, base.make_cache(), layers)
        choice = mx.argmax(logits[:, :-1], axis=-1).astype(mx.int32)
        labels.append(np.array(mx.concatenate([x[:, :1], choice], axis=1)))
        features.append(np.array(f.astype(mx.float16)))
        print(f"  labelled {s + len(labels[-1])}/{len(ids)}", file=sys.stderr, flush=True)
    return np.concatenate(labels), np.concatenate(features)


def greedy_continue(base, prompt_ids: np.ndarray, layers, batch: int = 64):
    """(tokens (N, LENGTH) int32, features (N, LENGTH, n*H) float16): each prompt continued by the base's
    greedy decoding (batched, with its own caches), and the base's outputs of `layers` at every position,
    captured on the way (the training never runs the base again)."""
    tokens, features = [], []
    for s in range(0, len(prompt_ids), batch):
        x = mx.array(prompt_ids[s : s + batch])
        cache = base.make_cache()
        logits, _, f = base.forward_layers(x, cache, layers)
        seq, feats = [x], [f.astype(mx.float16)]
        for _ in range(LENGTH - PROMPT):
            y = mx.argmax(logits[:, -1], axis=-1).astype(mx.int32)[:, None]
            logits, _, f = base.forward_layers(y, cache, layers)
            seq.append(y)
            feats.append(f.astype(mx.float16))
            mx.eval(logits, feats[-1])
        tokens.append(np.array(mx.concatenate(seq, axis=1)))
        features.append(np.array(mx.concatenate(feats, axis=1)))
        print(f"  generated {s + len(tokens[-1])}/{len(prompt_ids)}", file=sys.stderr, flush=True)
    return np.concatenate(tokens), np.concatenate(features)


# --- the batched training forward -----------------------------------------------------------------

def rope_at(x: mx.array, positions: mx.array, theta: float) -> mx.array:
    """Rotate-half RoPE (mx.fast.rope's traditional=False) at arbitrary positions: x (B, n, L, d), positions
    (B, L)."""
    d = x.shape[-1]
    freqs = theta ** (-mx.arange(0, d, 2, dtype=mx.float32) / d)  # (d/2,)
    angles = positions[:, None, :, None].astype(mx.float32) * freqs  # (B, 1, L, d/2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def heads(x, n):
    B, L, _ = x.shape
    return x.reshape(B, L, n, -1).transpose(0, 2, 1, 3)


def block_logits(drafter, base, features, tokens, anchors, lengths, block: int, head_t=None):
    """Drafter logits (B, N, block-1, V) for N blocks per sequence, all in one pass.

    features (B, T, n*H) of the base; tokens (B, T); anchors, lengths (B, N): block i of a sequence starts at
    position anchors[i] with token tokens[anchors[i]] and has lengths[i] rows (the rest are absent)."""
    a = drafter.args
    B, T = tokens.shape
    N = anchors.shape[1]
    slot = mx.arange(block)
    pos_blk = (anchors[:, :, None] + slot).reshape(B, N * block)  # (B, N*S)
    ids = mx.where(slot == 0, mx.take_along_axis(tokens, anchors, axis=1)[:, :, None], MASK_TOKEN)
    h = base.embed_scaled(ids.reshape(B, N * block))  # (B, N*S, H)
    ctx = drafter.hidden_norm(drafter.fc(features))  # (B, T, H)
    pos_ctx = mx.broadcast_to(mx.arange(T)[None], (B, T))
    # who sees whom: a block row sees context before its anchor and the present rows of its own block
    q_block = mx.arange(N * block) // block  # (Q,)
    see_ctx = mx.arange(T)[None, None, :] < mx.repeat(anchors, block, axis=1)[:, :, None]  # (B, Q, T)
    present = slot[None, None, :] < lengths[:, :, None]  # (B, N, S)
    see_blk = (q_block[:, None] == q_block[None, :])[None] & present.reshape(B, 1, N * block)  # (B, Q, Q)
    mask = mx.concatenate([see_ctx, see_blk], axis=-1)[:, None]  # (B, 1, Q, T+Q)
    for layer in drafter.layers:
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = rope_at(at.q_norm(heads(at.q_proj(x), at.n_heads)), pos_blk, a.rope_theta)
        k = mx.concatenate([rope_at(at.k_norm(heads(at.k_proj(ctx), at.n_kv_heads)), pos_ctx, a.rope_theta),
                            rope_at(at.k_norm(heads(at.k_proj(x), at.n_kv_heads)), pos_blk, a.rope_theta)], axis=2)
        v = mx.concatenate([heads(at.v_proj(ctx), at.n_kv_heads), heads(at.v_proj(x), at.n_kv_heads)], axis=2)
        rep = at.n_heads // at.n_kv_heads
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        scores = (q @ k.swapaxes(-1, -2)) * at.scale
        scores = mx.where(mask, scores, -1e9)
        o = (mx.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, N * block, -1)
        h = h + at.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = drafter.norm(h).reshape(B, N, block, -1)[:, :, 1:]
    # the base's tied head; a contiguous transposed copy multiplies ~2x faster on MLX's CPU backend
    return drafter.softcap(h @ head_t if head_t is not None else base.head(h))  # (B, N, S-1, V)


def sample_blocks(rng, B: int, N: int, block: int):
    """Anchors in the generated part (the last prompt token onwards) and random block lengths."""
    anchors = np.sort(rng.integers(PROMPT - 1, LENGTH - block + 1, size=(B, N)), axis=1)
    lengths = rng.integers(2, block + 1, size=(B, N))
    return mx.array(anchors, mx.int32), mx.array(lengths, mx.int32)


def loss_fn(drafter, base, features, tokens, labels, anchors, lengths, block, head_t=None):
    """Cross-entropy of each present row j >= 1 against labels[a+j], the base's greedy choice there, rows
    weighted towards the first drafts; and top-1 agreement by row."""
    logits = block_logits(drafter, base, features.astype(mx.float32), tokens, anchors, lengths, block, head_t)
    B, N = anchors.shape
    j = mx.arange(1, block)
    labels = mx.take_along_axis(labels, (anchors[:, :, None] + j).reshape(B, -1), axis=1).reshape(B, N, -1)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), labels)  # (B, N, S-1)
    present = j[None, None] < lengths[:, :, None]
    w = mx.exp(-(j - 1) / GAMMA)[None, None] * present
    top1 = ((mx.argmax(logits, -1) == labels) * present).sum(axis=(0, 1)) / mx.maximum(present.sum(axis=(0, 1)), 1)
    return (ce * w).sum() / w.sum(), top1


# --- check: batched training forward == inference path ---------------------------------------------

def check_against_inference(drafter, base, layers, tokens: np.ndarray, block: int) -> float:
    """Max |diff| between the training forward's logits and the context-cache + block_hidden path."""
    seq = mx.array(tokens[:1])
    a_pos, L = 100, block - 2
    _, _, feats = base.forward_layers(seq, base.make_cache(), layers)  # float32, not the stored float16
    got = block_logits(drafter, base, feats, seq, mx.array([[a_pos]]), mx.array([[L]]), block)[0, 0, : L - 1]
    cache = drafter.make_context_cache()
    drafter.extend_context(feats[:, :a_pos], cache)
    blk = mx.array([[int(tokens[0, a_pos])] + [MASK_TOKEN] * (L - 1)], mx.int32)
    want = drafter.softcap(base.head(drafter.block_hidden(base.embed_scaled(blk), cache)[0, 1:]))
    return float(mx.abs(got - want).max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sequences", type=int, default=640, help="greedy continuations of library windows")
    p.add_argument("--text-windows", type=int, default=2048, help="windows of library text, labelled by the base")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--anchors", type=int, default=16)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="start from the weights of a drafter this script saved (same shape)")
    p.add_argument("--data", help="path prefix: keep the generated sequences and features there and reuse them")
    args = p.parse_args()
    mx.random.seed(args.seed)
    base, tokenizer = load(str(BASE))
    base.freeze()
    config = drafter_config(base, args.block_size, args.layers, args.intermediate)
    drafter = gemma4_dflash.Model(gemma4_dflash.ModelArgs.from_dict(config))
    layers = tuple(drafter.target_layer_ids)
    if args.resume:
        drafter.load_weights(str(Path(args.resume) / "model.safetensors"))

    if args.data and Path(args.data + ".tokens.npy").exists():
        tokens, features = np.load(args.data + ".tokens.npy"), np.load(args.data + ".features.npy")
    else:
        t0 = time.perf_counter()
        tokens, features = greedy_continue(base, windows(tokenizer, args.sequences, PROMPT, args.seed), layers)
        print(f"data: {tokens.shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if args.data:
            np.save(args.data + ".tokens.npy", tokens)
            np.save(args.data + ".features.npy", features)
    labels = tokens  # greedy continuations: the next token is the base's choice
    if args.text_windows:
        real = args.data + f".text{args.text_windows}" if args.data else None
        if real and Path(real + ".tokens.npy").exists():
            text, text_labels, text_features = (np.load(real + f".{k}.npy") for k in ("tokens", "labels", "features"))
        else:
            t0 = time.perf_counter()
            text = windows(tokenizer, args.text_windows, LENGTH, args.seed + 1)
            text_labels, text_features = label_windows(base, text, layers)
            print(f"text: {text.shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            if real:
                for k, v in (("tokens", text), ("labels", text_labels), ("features", text_features)):
                    np.save(real + f".{k}.npy", v)
        tokens, labels = np.concatenate([tokens, text]), np.concatenate([labels, text_labels])
        features = np.concatenate([features, text_features])
    n_held = max(16, args.sequences // 32)  # held out: greedy continuations, what decoding will ask for

    steps, warm = args.steps, max(1, args.steps // 20)
    schedule = lambda s: args.lr * mx.minimum(1.0, (s + 1) / warm) * 0.5 * (1 + mx.cos(math.pi * mx.minimum(1.0, s / steps)))  # noqa: E731
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.0)
    head_t = mx.array(base.model.embed_tokens.weight.T)  # frozen
    mx.eval(head_t)
    loss_and_grad = nn.value_and_grad(drafter, lambda m, *a: loss_fn(m, base, *a, args.block_size, head_t)[0])

    rng = np.random.default_rng(args.seed)
    held_blocks = sample_blocks(np.random.default_rng(1), 16, args.anchors, args.block_size)
    held = (mx.array(features[:16]), mx.array(tokens[:16]), mx.array(labels[:16]), held_blocks[0],
            mx.full(held_blocks[1].shape, args.block_size, mx.int32))
    t0 = time.perf_counter()
    for step in range(steps):
        rows = rng.integers(n_held, len(tokens), size=args.batch)
        anchors, lengths = sample_blocks(rng, args.batch, args.anchors, args.block_size)
        loss, grads = loss_and_grad(drafter, mx.array(features[rows]), mx.array(tokens[rows]), mx.array(labels[rows]),
                                    anchors, lengths)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(drafter, grads)  # (mx.compile of the step measured no faster here: matmul-bound)
        mx.eval(drafter.parameters(), opt.state, loss)
        if step % 100 == 0 or step == steps - 1:
            held_loss, top1 = loss_fn(drafter, base, *held, args.block_size, head_t)
            print(f"step {step} loss {loss.item():.3f} held-out {held_loss.item():.3f} top-1 by row "
                  f"{[round(x, 2) for x in top1.tolist()]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    diff = check_against_inference(drafter, base, layers, tokens[:16], args.block_size)
    print(f"training forward vs inference path: max |diff| {diff:.2e}", file=sys.stderr)
    if diff > 1e-3:
        raise SystemExit("the training forward does not match the inference path")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(drafter.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
