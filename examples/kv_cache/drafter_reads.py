"""The MTP drafter reading a quantized base cache: quantized attention vs dequantize-on-read (CPU numbers).

    python examples/kv_cache/drafter_reads.py tiny            # the trained tiny pair, contexts 256..2000
    python examples/kv_cache/drafter_reads.py e2b 1024 4096   # the E2B drafter shape, random weights

Times one k=3 round (begin_round + 3 greedy steps) on caches filled with random K/V, the settings
interleaved round by round (this VM's speed drifts), median of 40, and the ratio to a full-precision cache.
"""

import os
import statistics
import sys
import time

import mlx.core as mx

from mlx_spec import shapes
from mlx_spec.cache import FullKVCache, KVQuant, QuantizedKV, SlidingKVCache
from mlx_spec.models import gemma4_assistant

S, F = "sliding_attention", "full_attention"
PAIR = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "gemma4-tiny-code")


def fill(cache, n_kv, hd, T, dtype, chunk=512):
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        cache.update_and_fetch(mx.random.normal((1, n_kv, n, hd)).astype(dtype),
                               mx.random.normal((1, n_kv, n, hd)).astype(dtype))
        mx.eval(cache.state)


def view(cache, dequantize: bool):
    k, v = cache.drafter_view()
    if dequantize and isinstance(k, QuantizedKV):
        return tuple(mx.dequantize(x.packed, x.scales, x.biases, group_size=x.group_size, bits=x.bits) for x in (k, v))
    return k, v


def one_round(stepper, caches, dequantize, T, H_base, k=3):
    e, h = mx.random.normal((1, H_base)), mx.random.normal((1, H_base))
    start = time.perf_counter()
    state = stepper.begin_round({t: view(c, dequantize) for t, c in caches.items()}, T)
    tokens = []
    for _ in range(k):
        token, h = stepper.greedy_step(state, e, h)
        tokens.append(token)
    mx.eval(tokens)
    return time.perf_counter() - start


def run(label, drafter, geometry, H_base, window, contexts, group, dtype=mx.float32, reps=40):
    stepper = drafter.stepper()
    for T in contexts:
        settings = {}
        for bits in (None, 8, 4):
            kv = KVQuant(bits, group) if bits else None
            caches = {S: SlidingKVCache(window, 17, kv), F: FullKVCache(kv)}
            mx.random.seed(0)
            for t, c in caches.items():
                fill(c, *geometry[t], T, dtype)
            for mode in (("quantized attention", "dequantize on read") if bits else ("full precision",)):
                settings[(bits, mode)] = caches
        times = {s: [] for s in settings}
        for _ in range(reps):
            for (bits, mode), caches in settings.items():
                times[(bits, mode)].append(one_round(stepper, caches, mode == "dequantize on read", T, H_base))
        base = statistics.median(times[(None, "full precision")])
        print(label, T, "; ".join(f"{b or 'fp'} {m}: {statistics.median(t) * 1e3:.2f} ms "
                                  f"({statistics.median(t) / base:.2f})" for (b, m), t in times.items()), flush=True)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    if which == "tiny":
        from mlx_spec import load, load_drafter

        model, _ = load(os.path.join(PAIR, "base"))
        drafter = load_drafter(os.path.join(PAIR, "assistant"), model)
        geometry = {t: model.attention_geometry(t)[::-1] for t in (S, F)}  # (n_kv, head_dim)
        run("tiny", drafter, geometry, model.args.hidden_size, model.args.sliding_window,
            [int(x) for x in sys.argv[2:]] or [256, 1024, 2000], 32)
    else:
        drafter = gemma4_assistant.Model(gemma4_assistant.ModelArgs.from_dict(shapes.drafter_config("e2b")))
        shapes._randomize(drafter, mx.float32, 1)
        drafter.masked_embedding.token_ordering = mx.random.permutation(262144).astype(mx.int32)
        mx.eval(drafter.parameters())
        run("e2b", drafter, {S: (1, 256), F: (1, 512)}, 1536, 512, [int(x) for x in sys.argv[2:]] or [1024, 4096], 64)


if __name__ == "__main__":
    main()
