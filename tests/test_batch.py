"""Continuous batching is exact: a request's output in a batch equals its output alone, greedy token for
token and seeded sampling in text, whatever else is in the batch, when it joined, which k the others
drafted and when they finished; and a row that leaves holds exactly its history in its caches.

Rows of different lengths cross the sliding window (16) in different rounds; the sliding rows-caches
compact (past keep + slack = 98 positions) while rows decode.
"""

import mlx.core as mx
import pytest

from tiny_models import WINDOW, _redraw, dflash_config, engine, dspark_config, make_base, make_block_drafter, \
    make_drafter, text_config
from mlx_spec.batch.cache import RowsSlidingCache, SLIDING_SLACK
from mlx_spec.batch.scheduler import Scheduler
from mlx_spec.cache import KVQuant
from mlx_spec.engine import Engine
from mlx_spec.models import gemma4_text
from mlx_spec.proposers import make_proposer
from mlx_spec.sampling import SamplingParams
from mlx_spec.draft_policy import FixedK
from mlx_spec.request import Request

PROMPTS = [[1, 5, 9, 3], [2, 7] * 10, list(range(3, 40)), [4], [9, 9, 8]]
MAX_TOKENS = [70, 30, 75, 25, 45]  # rows finish at different rounds; 37 + 75 positions pass a compaction
KS = [3, 1, 5, 2, 4]
_models = {}


def base(variant: str, quantizable: bool = False):
    """Tiny bases; the quantizable ones have head_dim 32 (mx.quantize needs groups of >= 32)."""
    key = (variant, quantizable)
    if key not in _models:
        if quantizable:
            cfg = {**text_config(variant), "head_dim": 32, "global_head_dim": 64}
            model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(cfg))
            _redraw(model, 0, std=0.08)
        else:
            model = make_base(variant)
        _models[key] = model
    return _models[key]


def proposer(model, kind: str):
    if kind == "plain":
        return None
    if kind == "mtp":
        return make_proposer(model, drafter=make_drafter(model))
    if kind == "ngram":
        return make_proposer(model, ngram=2)
    if kind == "draft_model":
        return make_proposer(model, draft_model=make_base("dense_keqv", seed=3))
    if kind == "eagle3":
        from test_eagle3 import make_eagle3

        return make_proposer(model, drafter=make_eagle3(model, aux=(1, 2, 3), draft_vocab=128))
    config = dflash_config(model) if kind == "dflash" else dspark_config(model)
    return make_proposer(model, drafter=make_block_drafter(config))


def alone(model, prompt, max_tokens, prop=None, k=3, **settings):
    eng = engine(model, prompt, proposer=prop, policy=FixedK(k), max_tokens=max_tokens, **settings)
    return [e.token for e in eng.run()]


def batched(model, prop=None, ks=KS, join_at=(0,) * 5, concurrency=8, cancel=None, **settings):
    """Every prompt through one scheduler; request i is submitted at step join_at[i]. Returns (tokens per
    request, how each ended, the engines)."""
    sched = Scheduler(model, decode_concurrency=concurrency)
    out = {i: [] for i in range(len(PROMPTS))}
    done, engines, tickets = {}, {}, {}
    step, todo = 0, list(range(len(PROMPTS)))
    while todo or not sched.idle:
        for i in [i for i in todo if join_at[i] <= step]:
            engines[i] = engine(model, PROMPTS[i], proposer=prop.fork() if prop else None, policy=FixedK(ks[i]),
                                max_tokens=MAX_TOKENS[i], **settings)

            def deliver(events, finished, i=i):
                out[i].extend(e.token for e in events)
                if finished is not None:
                    done[i] = finished

            tickets[i] = sched.submit(engines[i], deliver)
            todo.remove(i)
        if cancel and step == cancel[1]:
            tickets[cancel[0]].cancel()
        sched.step()
        step += 1
    return [out[i] for i in range(len(PROMPTS))], done, engines


def assert_alone(model, prop, got, done, **settings):
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        assert done[i].error is None, f"request {i} failed: {done[i].error!r}"
        want = alone(model, prompt, n, **settings)
        assert got[i] == want, f"request {i}: in a batch it gave other tokens than alone (first differ at " \
            f"{next((j for j, (a, b) in enumerate(zip(got[i], want)) if a != b), min(len(got[i]), len(want)))})"


@pytest.mark.parametrize("variant", ["e2b", "dense_keqv", "moe"])
@pytest.mark.parametrize("kind", ["plain", "mtp", "ngram"])
def test_greedy_rows_equal_alone(variant, kind):
    model = base(variant)
    prop = proposer(model, kind)
    got, done, _ = batched(model, prop)
    assert_alone(model, prop, got, done)


@pytest.mark.parametrize("kind", ["dflash", "dspark", "draft_model", "eagle3"])
def test_greedy_rows_equal_alone_other_proposers(kind):
    model = base("dense_keqv" if kind == "eagle3" else "e2b")  # the EAGLE-3 drafter's aux ids fit 4 layers
    prop = proposer(model, kind)
    got, done, _ = batched(model, prop)
    assert_alone(model, prop, got, done)


def test_rows_join_mid_way_and_wait_for_room():
    """Requests join at different steps, three rows at most: later ones wait, prefilled, for a row."""
    model = base("e4b")
    prop = proposer(model, "mtp")
    got, done, _ = batched(model, prop, join_at=(0, 2, 5, 9, 9), concurrency=3)
    assert_alone(model, prop, got, done)


def test_seeded_sampling_rows_equal_alone():
    """Coupled mode: the text is plain sampling's with the seed, whatever the batch."""
    model = base("e2b")
    prop = proposer(model, "mtp")
    settings = dict(sampling=SamplingParams(temp=1.0, top_k=50), seed=7)
    got, done, _ = batched(model, prop, **settings)
    assert_alone(model, None, got, done, **settings)


@pytest.mark.parametrize("start", [0, 30])
def test_quantized_kv_rows_equal_alone(start):
    """--kv-bits 8: with start 30 rows cross the switch in different rounds and change batches."""
    model = base("dense_keqv", quantizable=True)
    prop = make_proposer(model, drafter=make_drafter(model, "dense"))
    kv = KVQuant(8, 32, start)
    got, done, _ = batched(model, prop, kv=kv)
    assert_alone(model, None, got, done, kv=kv)


def test_logprobs_rows_equal_alone():
    model = base("e2b")
    prop = proposer(model, "mtp")
    sched = Scheduler(model)
    got = {}
    for i, prompt in enumerate(PROMPTS[:3]):
        eng = Engine(model, Request(prompt, max_tokens=20, logprobs=2), proposer=prop, policy=FixedK(KS[i]))
        sched.submit(eng, lambda events, finished, i=i: got.setdefault(i, []).extend(
            (e.token, e.logprob, e.top_logprobs) for e in events))
    sched.drain()
    for i, prompt in enumerate(PROMPTS[:3]):
        eng = Engine(model, Request(prompt, max_tokens=20, logprobs=2))
        assert got[i] == [(e.token, e.logprob, e.top_logprobs) for e in eng.run()], \
            f"request {i}: log-probabilities in a batch differ from alone"


def test_a_row_that_leaves_holds_exactly_its_history():
    """After leaving (finished, or cancelled mid-way) a row's caches equal a one-row engine's run to the
    same tokens: a prompt-cache slot continues from them."""
    model = base("e2b")
    prop = proposer(model, "mtp")
    got, done, engines = batched(model, prop, cancel=(2, 6))
    assert done[2].reason == "cancelled", "the cancelled request ends as cancelled"
    for i in range(len(PROMPTS)):
        eng = engines[i]
        ref = Engine(model, Request(PROMPTS[i], max_tokens=len(got[i])))
        assert [e.token for e in ref.run()] == got[i], f"request {i}: the tokens it got are plain decoding's"
        assert eng.cache[0].offset == len(eng.history) - 1, f"request {i}: the cache holds history[:-1]"
        for c, r in zip(eng.cache, ref.cache):
            a, b = c.state, r.state
            assert c.offset == r.offset and all(mx.array_equal(x, y).item() for x, y in zip(a, b)), \
                f"request {i}: a cache after leaving the batch differs from the one-row engine's"


def test_sliding_rows_compact_past_their_slack():
    """The longest row runs past keep + slack, so the rows-cache compacts (and stays exact: above)."""
    keep = WINDOW + 1 + 17
    assert len(PROMPTS[2]) + MAX_TOKENS[2] > keep + SLIDING_SLACK, "a row must outgrow the sliding buffer"
    cache = RowsSlidingCache(mx.zeros((2, 1, keep + SLIDING_SLACK, 4)), mx.zeros((2, 1, keep + SLIDING_SLACK, 4)),
                             [200, 20], [keep + SLIDING_SLACK - 1, 20], None, False, WINDOW)
    capacity, ends = cache._layout_after(3)
    assert ends == [keep, 20], "compaction keeps each row's last `keep` positions (or all it has)"


def test_each_rows_drafts_and_q_are_its_own(trained_pair):
    """MTP drafts all rows in one pass per step: each row's drafts and their distributions q (what rejection
    sampling divides by) equal what the one-row proposer gives for that row's context, sampler and noise."""
    from mlx_spec.batch.cache import stack_rows
    from mlx_spec.proposers.base import RoundContext
    from mlx_spec.sampling import Sampler

    model, tok, drafter = trained_pair
    prop = make_proposer(model, drafter=drafter)
    settings = [SamplingParams(temp=1.5, top_k=5, acceptance="rejection"), SamplingParams(),
                SamplingParams(temp=0.6, acceptance="rejection"), SamplingParams(temp=1.0, acceptance="rejection")]
    ctxs, caches = [], []
    for i, params in enumerate(settings):
        ids = tok.encode(["def fibonacci(n):", "import os\n", "class Stack:\n    def", "x = [1, 2"][i])
        cache = model.make_cache(17)
        _, hidden = model.forward(mx.array([ids[:-1]]), cache)
        caches.append(cache)
        ctxs.append(RoundContext(ids, len(ids) - 1, hidden[:, -1:], cache, Sampler(params, seed=40 + i)))
    rows = stack_rows(caches)
    batched = prop.propose_rows([RoundContext(c.history, c.position, c.hidden.reshape(1, -1), None, c.sampler)
                                 for c in ctxs], [3, 2, 3, 1], rows, [0, 1, 2, 3])
    for i, (ctx, k) in enumerate(zip(ctxs, [3, 2, 3, 1])):
        alone = prop.propose(ctx, k)
        assert batched[i].tokens.tolist() == alone.tokens.tolist(), f"row {i}: its drafts"
        if alone.probs is None:
            assert batched[i].probs is None, f"row {i}: greedy drafts carry no q"
        else:
            assert mx.allclose(batched[i].probs, alone.probs, atol=1e-5).item(), f"row {i}: q is its own"


def test_a_long_prompt_prefills_a_chunk_per_round_while_rows_decode():
    """A request with a long prompt joins two running rows: its prefill runs one chunk per step, and the
    running rows get a round (tokens) at every one of those steps."""
    model = base("e2b")
    sched = Scheduler(model, decode_concurrency=4, prompt_concurrency=1)
    log = []
    for i in range(2):
        sched.submit(engine(model, PROMPTS[i], policy=FixedK(0), max_tokens=60),
                     lambda events, done, i=i: log.append((i, len(events))))
    for _ in range(3):
        sched.step()  # both running
    chunks = []
    long_prompt = [(7 * j) % 250 + 3 for j in range(100)]  # 99 positions to prefill: 7 chunks of 16
    sched.submit(engine(model, long_prompt, policy=FixedK(0), max_tokens=5, prefill_step=16,
                        on_prefill=lambda done, total: chunks.append(len(log))),
                 lambda events, done: log.append(("long", len(events))))
    while not any(entry[0] == "long" for entry in log):
        sched.step()
    assert len(chunks) == 7, "the long prompt prefilled in its 16-token chunks"
    between = [chunks[j + 1] - chunks[j] for j in range(len(chunks) - 1)]
    assert all(n == 2 for n in between), f"each running row got one round between two chunks: {between}"


def test_strict_rows_pad_the_batch_width_and_stay_exact():
    """Strict mode (on a device whose kernels change with the row count) pads every pass to its row count;
    in a batch every row's pass is that wide. Here (rows compute alike) it must change nothing."""
    model = base("e2b")
    prop = proposer(model, "mtp")
    got, done, _ = batched(model, prop, strict_rows=9)
    assert_alone(model, prop, got, done)


def test_a_strict_row_keeps_its_width_beside_wider_rows(monkeypatch):
    """A strict row runs every pass at its row count alone; beside rows asking more drafts (k=8) or a tree,
    the batch caps them so no pass is wider, and every row still gives its output alone."""
    from mlx_spec.batch.engine import Batch
    from mlx_spec.draft_policy import FixedTree

    model = base("e2b")
    prop = proposer(model, "mtp")
    widths, forward = [], Batch._forward

    def recording(self, verify, drafts):
        if any(r.engine.strict_rows for r in self.rows):  # once the strict row has left, the others widen
            widths.append(verify.shape[1])
        return forward(self, verify, drafts)

    monkeypatch.setattr(Batch, "_forward", recording)
    sched, got = Scheduler(model, decode_concurrency=4), {}
    rows = [dict(policy=FixedK(3), strict_rows=4), dict(policy=FixedK(8)), dict(policy=FixedTree(8))]
    for i, kw in enumerate(rows):
        sched.submit(engine(model, PROMPTS[i], proposer=prop.fork(), max_tokens=MAX_TOKENS[i], **kw),
                     lambda events, done, i=i: got.setdefault(i, []).extend(e.token for e in events))
    sched.drain()
    assert widths and set(widths) == {4}, f"every pass at the strict row's width 4, got {sorted(set(widths))}"
    for i in range(len(rows)):
        assert got[i] == alone(model, PROMPTS[i], MAX_TOKENS[i]), f"row {i} differs from its output alone"


def test_prompt_concurrency_prefills_that_many_at_once():
    """Two long prompts with --prompt-concurrency 2 both prefill from the first step, a chunk each per step
    (a request mid-prefill must not read as one that waits for memory and hold back the next)."""
    model = base("e2b")
    sched = Scheduler(model, decode_concurrency=4, prompt_concurrency=2)
    chunks = {0: [], 1: []}
    for i in range(2):
        prompt = [(7 * j + i) % 250 + 3 for j in range(65)]  # 64 positions to prefill: 4 chunks of 16
        sched.submit(engine(model, prompt, policy=FixedK(0), max_tokens=3, prefill_step=16,
                            on_prefill=lambda done, total, i=i: chunks[i].append(done)),
                     lambda events, done: None)
    for step in range(3):
        sched.step()
        assert len(chunks[0]) == len(chunks[1]) == step + 1, f"step {step}: both prompts ran a chunk {chunks}"
