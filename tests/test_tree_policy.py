"""`--tree-nodes auto`: chains or trees each round by expected tokens / measured round cost. Weight-free: a
simulated drafter whose trees keep more than its chains, on a machine with cheap rows (Apple silicon's
verify curve) and on one where rows cost compute (this CPU); and what the surfaces accept."""

import numpy as np
import pytest

from mlx_spec.draft_policy import FixedTree, tree_budget
from mlx_spec.errors import MlxSpecError
from mlx_spec.proposers.base import RoundResult
from mlx_spec.tuning import Costs
from mlx_spec.tuning.trees import AutoTreePolicy
from mlx_spec.tuning.tuner import check_tree_nodes, draft_policy

K = 16
# mlxcel's M3 Ultra curve: a round of K verified rows costs 0.83 + 0.17 K plain steps; drafting ~0.1 a step
MAC = Costs(verify=[0.83 + 0.17 * (k + 1) for k in range(K + 1)], draft_fixed=0.05, draft_step=0.1,
            tree={n: 0.83 + 0.17 * (n + 1) + 0.05 + 0.1 * n for n in (4, 8, 16)})
# this CPU: every verified row costs about as much compute as a plain step's, and a tree's drafting more
CPU = Costs(verify=[0.8 + 0.2 * (k + 1) for k in range(K + 1)], draft_fixed=0.15, draft_step=0.17,
            tree={4: 3.6, 8: 6.8, 16: 13.0})


def simulate(policy, rounds=3000, chain_alpha=0.6, tree_alpha=0.85, seed=0):
    """Drive the policy: a chain's draft i is kept with chain_alpha given the earlier ones; a tree's branch
    grows with tree_alpha per depth (its other candidates catch what the first misses), depth <= nodes.
    Returns (tokens per plain-step cost, the choices made)."""
    rng = np.random.default_rng(seed)
    tokens = cost = 0.0
    choices = []
    for _ in range(rounds):
        k = policy.next_k()
        nodes = tree_budget(policy) if k else 0
        if k == 0:
            tokens, cost = tokens + 1, cost + 1
            choices.append("plain")
            continue
        alpha, limit = (tree_alpha, min(k, nodes)) if nodes else (chain_alpha, k)
        n = 0
        while n < limit and rng.random() < alpha:
            n += 1
        policy.observe(RoundResult(nodes or k, n, tree=bool(nodes)))
        tokens += n + 1
        cost += policy.costs.tree[nodes] if nodes else policy.costs.round_cost(k)
        choices.append(f"tree{nodes}" if nodes else "chain")
    return tokens / cost, choices


def best_chain(costs, alpha=0.6, seed=0):
    """The best fixed chain's tokens per cost, by the same simulation."""
    return max(simulate(_Fixed(costs, k), chain_alpha=alpha, seed=seed)[0] for k in range(1, 9))


class _Fixed:
    def __init__(self, costs, k):
        self.costs, self.k = costs, k

    def next_k(self):
        return self.k

    def observe(self, result):
        pass


def test_auto_takes_trees_where_rows_are_cheap():
    speed, choices = simulate(AutoTreePolicy(MAC))
    share = sum(c.startswith("tree") for c in choices) / len(choices)
    assert share > 0.8, f"cheap rows and trees that keep more: trees in most rounds ({share:.0%})"
    assert speed > 1.1 * best_chain(MAC), "... and faster than the best chain"


def test_auto_is_never_slower_than_the_best_chain_where_rows_cost_compute():
    from mlx_spec.tuning import AutoDraftPolicy

    for alpha in (0.6, 0.8, 0.95):
        speed, choices = simulate(AutoTreePolicy(CPU), chain_alpha=alpha, tree_alpha=min(1.0, alpha + 0.2))
        assert not any(c.startswith("tree") for c in choices), \
            "where a tree round costs more than its extra tokens can repay, no tree is ever tried"
        chains, _ = simulate(AutoDraftPolicy(CPU), chain_alpha=alpha)
        assert speed == chains, f"auto with trees ({speed:.3f}) runs as auto with chains only ({chains:.3f})"


def test_auto_drops_trees_that_keep_no_more_than_chains():
    speed, choices = simulate(AutoTreePolicy(MAC), tree_alpha=0.6)
    late = choices[len(choices) // 2 :]
    assert sum(c.startswith("tree") for c in late) / len(late) < 0.1, \
        "trees tried, then left where they keep no more than the chain of as many rows"


def test_auto_decodes_plainly_where_neither_pays():
    costly = Costs(verify=[1.0 + 1.0 * k for k in range(K + 1)], draft_step=0.3, tree={4: 8.0, 8: 16.0, 16: 30.0})
    policy = AutoTreePolicy(costly)
    _, choices = simulate(policy, rounds=300)
    assert set(choices) == {"plain"} and policy.never, "no chain and no tree can pay: plain decoding"


def test_costs_with_trees_round_trip():
    assert Costs.from_json(MAC.to_json()) == MAC, "tree round costs survive the costs file"
    assert Costs.from_json({"verify": [1.0]}).tree == {}, "an older file has no tree costs"


@pytest.mark.parametrize("value, k, message", [
    ("auto", 3, "needs num_draft_tokens 'auto'"), (17, 3, "between 0 and 16"), (-1, 3, "between 0 and 16"),
    (True, 3, "between 0 and 16"), ("many", "auto", "between 0 and 16")])
def test_bad_tree_nodes_are_user_errors(value, k, message):
    with pytest.raises(MlxSpecError, match=message):
        check_tree_nodes(value, k)


def test_fixed_trees_and_their_depth():
    policy = draft_policy(3, None, None, tree_nodes=None)
    assert tree_budget(policy) == 0, "no tree_nodes: chains"
    fixed = FixedTree(8, depth=3)
    assert (fixed.next_k(), fixed.next_nodes()) == (3, 8), "an int k bounds the tree's depth"


def make_llama():
    """A tiny mlx-lm llama: a base whose verify pass runs its positions in sequence only."""
    from mlx_lm.models import llama

    return llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=64,
                                       num_key_value_heads=2))


def test_trees_need_a_base_and_proposer_that_can_grow_them(trained_pair):
    from mlx_spec.proposers import make_proposer

    model, _, drafter = trained_pair
    with pytest.raises(MlxSpecError, match="drafts chains only"):
        draft_policy(3, model, make_proposer(model, draft_model=model), tree_nodes=8)
    with pytest.raises(MlxSpecError, match="needs a Gemma 4 base"):
        draft_policy(3, make_llama(), make_proposer(make_llama(), ngram=2), tree_nodes=8)
    assert isinstance(draft_policy(3, model, make_proposer(model, drafter=drafter), tree_nodes=8), FixedTree)


def test_tree_costs_reuse_the_chain_costs(tmp_path):
    """auto with trees decides between chains on the very costs auto without trees uses: the trees' probe
    adds tree rounds and the rows past the chain's, nothing else."""
    from types import SimpleNamespace

    from mlx_spec.tuning import CostsStore

    calls = []

    def fake_probe(model, proposer, clock=None, tree_budgets=(), kv=None, **kw):
        calls.append(tuple(tree_budgets))
        return Costs(verify=[float(len(calls))] * (17 if tree_budgets else 9), draft_step=0.1 * len(calls),
                     tree={n: 5.0 for n in tree_budgets})

    store = CostsStore(tmp_path / "tuning.json", measure=fake_probe)
    store.model_identity = lambda model: {"weights_hash": "tiny"}
    proposer = SimpleNamespace(identity="mtp:abc")
    chain = store.get(None, proposer)
    trees = store.get(None, proposer, tree_budgets=(4, 8, 16))
    assert calls == [(), (4, 8, 16)], "the chain costs are measured once, the trees' on their first use"
    assert trees.verify[:9] == chain.verify and trees.draft_step == chain.draft_step, "chain costs shared"
    assert len(trees.verify) == 17 and trees.tree == {4: 5.0, 8: 5.0, 16: 5.0}, "rows up to 16 and tree rounds"


def test_a_request_sets_its_tree():
    from mlx_spec.server.requests import RequestDefaults, RequestError, parse_request

    req = parse_request({"prompt": "x", "tree_nodes": 8}, "text")
    assert req.tree_nodes == 8, "a request's tree_nodes"
    assert parse_request({"prompt": "x"}, "text", RequestDefaults(tree_nodes=4)).tree_nodes == 4, \
        "the server's --tree-nodes is the default"
    for bad in ({"tree_nodes": 17}, {"tree_nodes": "auto", "num_draft_tokens": 3}, {"tree_nodes": True}):
        with pytest.raises(RequestError):
            parse_request({"prompt": "x", **bad}, "text")


def test_the_command_refuses_a_tree_it_cannot_grow(capsys):
    from conftest import TINY_CODE

    from mlx_spec.generate import main

    rc = main(["--model", str(TINY_CODE / "base"), "--draft-model", str(TINY_CODE / "base"), "--prompt", "x",
               "--tree-nodes", "8", "--num-draft-tokens", "4", "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --tree-nodes" in err and "Traceback" not in err, "one error line, exit 2"


def test_a_batch_policys_k_is_a_chain():
    """In a batch, the batch policy assigns the auto rows' k (tuning/batch_policy.py weighs chains only): a
    tree policy whose own last choice was a tree must then draft a chain of that k, not the old tree."""
    policy = AutoTreePolicy(MAC)
    simulate(policy, rounds=50)
    assert policy.next_k() and tree_budget(policy) > 0, "on cheap rows the policy's own choice is a tree"
    policy.assign(3)
    assert tree_budget(policy) == 0, "a k the batch policy assigned drafts a chain"
