"""Exact speculative decoding over mx.distributed: 2 ranks on localhost (`mlx.launch --backend ring`, MLX's CPU
backend), tensor and pipeline parallel.

Each launched test runs tests/distributed_worker.py (or a command) on every rank and compares what the ranks
wrote: the ranks with each other (the same tokens every round), speculative with plain under the same
sharding (token for token, every proposer family, past the sliding window), and the sharded model with one
process (an all-reduce sums in another order: a flip is allowed only at a near-tie, and is reported).
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_CODE

LAUNCH = str(Path(sys.executable).parent / "mlx.launch")
WORKER = str(Path(__file__).resolve().parent / "distributed_worker.py")
MODES = ("tensor", "pipeline")
TIE = 1e-3  # a flip against one process is allowed where its top-2 margin is below this, relative


def _free_ports(n: int) -> int:
    """A first port p with p .. p+n-1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        p = random.randint(20000, 60000)
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch(args, n: int = 2, timeout: float = 240, env=None):
    """mlx.launch -n N ARGS on localhost: (stdout, stderr). stdin stays an open, silent pipe (at EOF the launcher
    would spin on it)."""
    import tempfile

    cmd = [LAUNCH, "--backend", "ring", "-n", str(n), "--starting-port", str(_free_ports(n)), "--", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started (their own group)
            proc.wait()
        finally:
            proc.stdin.close()
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode and proc.returncode < 0:
        pytest.fail(f"mlx.launch did not finish in {timeout} s (a hang):\n{errors[-3000:]}")
    return text, errors


def run_worker(tmp_path, scenario: str, *args, n: int = 2, timeout: float = 240) -> list:
    """Every rank's JSON result, by rank."""
    out_dir = tmp_path / f"{scenario}-out"
    out_dir.mkdir()
    out, err = launch([sys.executable, WORKER, scenario, str(out_dir), *map(str, args)], n, timeout)
    files = [out_dir / f"rank{r}.json" for r in range(n)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"ranks wrote no result ({missing}):\n{err[-4000:]}"
    return [json.loads(f.read_text()) for f in files]


def first_difference(a: list, b: list):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_tie_aware(sharded: list, one: list, margins: list, what: str) -> str:
    """Sharded greedy equals one process's up to the first near-tie flip; returns a report of the flip."""
    i = first_difference(sharded, one)
    if i is None:
        return f"{what}: identical to one process"
    assert i < len(margins) and margins[i] < TIE * max(1.0, abs(margins[i])) + TIE, (
        f"{what}: sharded greedy leaves one process's at token {i} where its top-2 margin is {margins[i]:.4g}, "
        "not a near-tie: the sharded model computes something else")
    return f"{what}: near-tie flip at token {i}, one process's top-2 margin {margins[i]:.3g}"


# -- single process: the pieces -----------------------------------------------------------------------------

def test_kv_heads_each_rank_holds_what_its_query_heads_read():
    from mlx_spec.distributed.tensor import kv_heads

    class Group:
        def __init__(self, r, n):
            self.r, self.n = r, n

        def rank(self):
            return self.r

        def size(self):
            return self.n

    for n_heads, n_kv, N in [(8, 1, 2), (16, 8, 2), (16, 2, 4), (32, 4, 2), (8, 2, 8)]:
        for r in range(N):
            start, stop = kv_heads(n_kv, Group(r, N))
            q = range(r * n_heads // N, (r + 1) * n_heads // N)
            needed = {h // (n_heads // n_kv) for h in q}
            assert set(range(start, stop)) == needed, (
                f"{n_heads} heads / {n_kv} K/V heads over {N} ranks: rank {r} holds K/V heads {start}:{stop} but its "
                f"query heads read {sorted(needed)} (GQA maps head h to h // (heads / kv heads))")


def test_pipeline_split_is_mlx_lms():
    from mlx_spec.distributed.pipeline import split
    from mlx_spec.errors import DistributedError

    assert split(35, 2) == [18, 17] and split(6, 4) == [2, 2, 1, 1], "an even split, the low ranks take the extra"
    with pytest.raises(DistributedError, match="cannot split 2 decoder layers"):
        split(2, 3)


def test_quantized_columns_cut_on_whole_groups():
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_spec.distributed.slicing import take_columns

    table = nn.Embedding(10, 256)
    table.weight = mx.random.normal((10, 256))
    q = nn.QuantizedEmbedding.from_embedding(table, group_size=64, bits=4)
    whole = q(mx.arange(10))
    take_columns(q, 64, 192)
    assert mx.array_equal(q(mx.arange(10)), whole[:, 64:192]), "a quantized table cut to columns 64:192 must look " \
        "up exactly those columns of the whole table"


def test_non_root_ranks_write_only_their_errors():
    import io

    from mlx_spec.distributed.commands import _ErrorsOnly

    real = io.StringIO()
    stream = _ErrorsOnly(real, 1)
    print("Generation: 40 tokens", file=stream)
    print("error: the model is missing", file=stream)
    assert real.getvalue() == "[rank 1] error: the model is missing\n", "a non-root rank's stderr passes its own " \
        "error lines only, marked with its rank"


# -- two ranks ------------------------------------------------------------------------------------------------

def check_exact(tmp_path, mode: str, sweep: bool = False) -> None:
    from checkpoints import make_dspark_checkpoint

    dspark = make_dspark_checkpoint(tmp_path, TINY_CODE / "base", target_layer_ids=(0, 2))
    ranks = run_worker(tmp_path, "exact", mode, dspark, *(["sweep"] if sweep else []), timeout=600)
    assert ranks[0] == ranks[1], "every rank must hold the same tokens and margins"
    res = ranks[0]
    plain = res["plain"]
    assert len(plain) == 40, "the prompt (16 tokens) and the output must pass the 32-token sliding window"
    names = [n for n in res if n.startswith("mtp")] + ["dflash", "dspark", "ngram", "draft model"]
    for name in names:
        assert res[name] == plain, f"{mode} parallel: greedy with {name} drafting must equal plain decoding under " \
            f"the same sharding, token for token (first difference at {first_difference(res[name], plain)})"
    if sweep:
        assert res["sampled mtp"] == res["sampled plain"], "seeded sampling (coupled acceptance) must give plain " \
            "sampling's tokens with drafting on, under the same sharding"
        assert res["kv8 mtp"] == res["kv8 plain"], "with 8-bit K/V (mirrored quantized caches in pipeline mode) " \
            "greedy with drafting must equal plain decoding under the same sharding"
    print(assert_tie_aware(plain, res["one process"], res["one process margins"], f"{mode} parallel, trained pair"))


@pytest.mark.parametrize("mode", MODES)
def test_speculation_equals_plain_on_every_rank(tmp_path, mode):
    check_exact(tmp_path, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_speculation_equals_plain_on_every_rank_sweep(tmp_path, mode):
    """More draft lengths (1, 3, 5) and seeded sampling (coupled acceptance) under sharding."""
    check_exact(tmp_path, mode, sweep=True)


ALL_SHAPES = [("e2b", 0), ("e4b", 0), ("26b", 0), ("12b", 0), ("31b", 0), ("e2b", 4), ("26b", 4)]
# by default each mode gets a few (every feature covered: per-layer inputs, KV sharing across stages, K/V heads
# replicated and split, k_eq_v, experts, the unified layout, quantized tables and experts); -m slow: all of them
SOME_SHAPES = {"tensor": [("e2b", 0), ("26b", 4), ("12b", 0)], "pipeline": [("e4b", 0), ("31b", 0), ("e2b", 4)]}


def check_shapes(tmp_path, mode: str, shapes) -> None:
    from shape_checkpoints import write_shape

    dirs = [write_shape(tmp_path, s, q_bits=q)[0] for s, q in shapes]
    ranks = run_worker(tmp_path, "shapes", mode, *dirs, timeout=600)
    for name, res in ranks[0].items():
        other = ranks[1][name]
        assert {k: v for k, v in res.items() if k != "bytes"} == {k: v for k, v in other.items() if k != "bytes"}, \
            f"{name}: every rank must compute the same tokens"
        assert res["spec"] == res["sharded"], f"{name}, {mode} parallel: greedy with MTP drafting must equal " \
            "plain decoding under the same sharding"
        print(assert_tie_aware(res["sharded"], res["one"], res["margins"], f"{name}, {mode} parallel"))
        share = max(res["bytes"], other["bytes"]) / res["whole"]
        # replicated by design: norms, routers, per-layer-input gates (tensor), embeddings and head too (pipeline);
        # at these tiny widths they weigh more than in the published models (E2B: about 1% of its weights)
        limit = 0.6 if mode == "tensor" else 0.7
        print(f"{name}, {mode} parallel: each rank holds {share:.2f} of the weights")
        assert share < limit, f"{name}, {mode} parallel: a rank holds {share:.2f} of the weights, not about 1/2"


@pytest.mark.parametrize("mode", MODES)
def test_variant_shapes_shard(tmp_path, mode):
    check_shapes(tmp_path, mode, SOME_SHAPES[mode])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_every_variant_shape_shards(tmp_path, mode):
    check_shapes(tmp_path, mode, ALL_SHAPES)


def test_a_rank_without_the_model_stops_every_rank(tmp_path):
    ranks = run_worker(tmp_path, "missing", "tensor", timeout=120)
    for r, res in enumerate(ranks):
        assert res["type"] == "DistributedError" and "failed on rank 1" in res["error"] \
            and "/nonexistent/gemma" in res["error"], f"rank {r} must get the one error naming rank 1: {res}"


def test_generate_under_mlx_launch_writes_once(tmp_path, capsys):
    from mlx_spec.generate import main

    args = ["--model", str(TINY_CODE / "base"), "--prompt", "def main(", "--max-tokens", "40",
            "--ignore-chat-template", "--num-draft-tokens", "3"]
    assert main(args) == 0
    one = capsys.readouterr().out
    out, err = launch([sys.executable, "-m", "mlx_spec.generate", *args, "--drafter", str(TINY_CODE / "assistant"),
                       "--check-ranks"])
    assert out == one, "under mlx.launch rank 0 alone writes the text, the same as one process's"
    for line in ("[mlx_spec] distributed: tensor parallel over 2 ranks", "Generation:", "Speculation:"):
        assert err.count(line) == 1, f"{line!r} must be on stderr once (rank 0's):\n{err}"


def test_measure_example_runs_in_one_process():
    """examples/distributed/measure.py (the numbers in docs/DISTRIBUTED.md) runs as written; here without ranks."""
    from conftest import ROOT

    r = subprocess.run([sys.executable, "examples/distributed/measure.py", "speed", "--model", str(TINY_CODE / "base"),
                        "--drafter", str(TINY_CODE / "assistant"), "--max-tokens", "8", "--repeats", "1", "--reps",
                        "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    assert row.get("mode") == "one process" and row["plain_tps"] > 0 and row["spec_tps"] > 0, r.stderr[-2000:]


@pytest.mark.slow
def test_bench_under_mlx_launch():
    out, err = launch([sys.executable, "-m", "mlx_spec.bench", "--model", str(TINY_CODE / "base"), "--drafter",
                       str(TINY_CODE / "assistant"), "--num-draft-tokens", "3", "--max-tokens", "16", "--repeats", "1",
                       "--prompts", "code", "--ignore-chat-template", "--quiet"], timeout=600)
    assert out.count("parity: not checked (the model is split over ranks)") == 1 and "mtp k=3" in out, \
        f"rank 0 alone writes the table, once:\n{out}\n{err[-2000:]}"
    assert err.count("[mlx_spec] distributed:") == 1


@pytest.mark.slow
def test_chat_under_mlx_launch():
    """mlx.launch gives every rank the lines typed into it: every rank runs the same turns, rank 0 answers."""
    import tempfile

    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_ports(2)), "--", sys.executable, "-m",
           "mlx_spec.chat", "--model", str(TINY_CODE / "base"), "--drafter", str(TINY_CODE / "assistant"),
           "--max-tokens", "12", "--num-draft-tokens", "3"]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        proc.stdin.write("def main(\nimport os\n/quit\n")
        proc.stdin.flush()
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("chat under mlx.launch did not end at /quit")
        out.seek(0)
        text = out.read()
    import re

    assert len(re.findall(r"^\[\d+ tokens", text, flags=re.M)) == 2 and text.count("[mlx_spec] distributed:") == 1, \
        f"two turns, answered once (by rank 0):\n{text}"


def test_a_split_that_does_not_divide_is_one_error():
    out, err = launch([sys.executable, "-m", "mlx_spec.generate", "--model", str(TINY_CODE / "base"), "--prompt",
                       "x", "--max-tokens", "2"], n=3, timeout=120)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "3 ranks cannot split the 4 attention heads" in errors[0], \
        f"one error line for all ranks, naming the split:\n{err}"
    assert "Traceback" not in err and out == ""


def test_ranks_that_never_connect_are_an_error_not_a_hang(tmp_path):
    port = _free_ports(2)
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), "MLX_SPEC_CONNECT_TIMEOUT": "2"}
    proc = subprocess.run([sys.executable, "-m", "mlx_spec.generate", "--model", str(TINY_CODE / "base"), "--prompt",
                           "x"], env=env, capture_output=True, text=True, timeout=60)
    # the blocked rank is ended by its watchdog (SIGTERM): no exit code of its own, one error line
    assert proc.returncode != 0 and proc.stderr.count("error:") == 1 \
        and "error: the ranks did not connect within 2 s" in proc.stderr, proc.stderr


def test_server_under_mlx_launch_answers_the_openai_client(tmp_path):
    """Rank 0 alone listens; rank 1 follows every turn it runs (to the token where a stop string ends it), so
    the texts are one process's, request after request, streamed or not."""
    import time
    import urllib.request

    openai = pytest.importorskip("openai")
    from mlx_spec import generate, load

    import re

    cmd = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(_free_ports(2)), "--", sys.executable, "-m",
           "mlx_spec.server", "--model", str(TINY_CODE / "base"), "--drafter", str(TINY_CODE / "assistant"),
           "--port", "0", "--num-draft-tokens", "3", "--check-ranks"]  # port 0: a free one, named on stderr
    err = tmp_path / "stderr"
    with open(err, "w") as err_file:
        server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_file, text=True,
                                  start_new_session=True)
    try:
        for _ in range(1200):
            found = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", err.read_text())
            if found:
                port = int(found.group(1))
                break
            assert server.poll() is None, f"the server exited:\n{err.read_text()}"
            time.sleep(0.1)
        else:
            pytest.fail(f"the server did not start:\n{err.read_text()}")
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        model, tokenizer = load(str(TINY_CODE / "base"))
        prompts = ["def main(", "import os\n"]
        for prompt in prompts:
            r = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0)
            assert r.choices[0].text == generate(model, tokenizer, prompt, max_tokens=24), \
                "under mlx.launch the server's text is one process's"
            assert r.model_extra["speculative"]["proposer"] == "mtp"
        whole = generate(model, tokenizer, prompts[0], max_tokens=24)
        stop = whole[10:14]  # a stop string inside the text: rank 0 ends the turn early, and rank 1 with it
        chunks = client.completions.create(model="m", prompt=prompts[0], max_tokens=24, temperature=0, stop=[stop],
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks) == whole[: whole.index(stop)]
        r = client.completions.create(model="m", prompt=prompts[1], max_tokens=8, temperature=0)
        assert r.choices[0].text == generate(model, tokenizer, prompts[1], max_tokens=8), \
            "after a turn cut short, the ranks still run the same turns"
        from concurrent.futures import ThreadPoolExecutor

        asks = [(prompts[0], {"stop": [stop]}), (prompts[1], {}), ("class A:\n", {"seed": 3, "temperature": 0.8})]
        with ThreadPoolExecutor(3) as pool:  # at once: rank 1 follows rank 0's batches, step by step
            texts = list(pool.map(lambda a: client.completions.create(
                model="m", prompt=a[0], max_tokens=20, **{"temperature": 0, **a[1]}).choices[0].text, asks))
        assert texts[0] == whole[: whole.index(stop)] and texts[1] == generate(model, tokenizer, prompts[1],
                                                                                max_tokens=20)
        assert texts[2] == generate(model, tokenizer, "class A:\n", max_tokens=20, temp=0.8, seed=3), \
            "concurrent requests, batched on both ranks, each as one process gives it"
        assert server.poll() is None and "error" not in err.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_trees_are_refused_across_ranks_and_a_clients_tree_becomes_chains():
    """Tree verification over split layers is not checked: the flag is one error before loading, the Python
    API refuses it, and a server's client asking for a tree gets chains (the same on every rank)."""
    from argparse import Namespace

    from mlx_spec.api import agree
    from mlx_spec.distributed.commands import _refuse_unsupported
    from mlx_spec.distributed.serving import agreed
    from mlx_spec.errors import MlxSpecError
    from mlx_spec.request import Request

    with pytest.raises(MlxSpecError, match="--tree-nodes is not supported across ranks"):
        _refuse_unsupported(Namespace(tree_nodes="auto"))
    _refuse_unsupported(Namespace(tree_nodes=0))  # chains: accepted
    with pytest.raises(MlxSpecError, match="tree_nodes is not supported on a model split over ranks"):
        agree(None, Request([1, 2, 3], tree_nodes=4), None)
    assert agreed(Request([1, 2, 3], tree_nodes=4, seed=1)).tree_nodes == 0, "a client's tree becomes chains"
