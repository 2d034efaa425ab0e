"""batch_generate: several prompts at once, each text what generate gives for it alone (greedy token for
token, seeded sampling in text), with per-prompt limits, stop strings and any proposer."""

import pytest

from mlx_spec import Request, batch_generate, generate

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\ndef main():", "class Stack:\n    def __init__(self):",
           "for i in range(10):", "x = 1\ny = 2\n"]


@pytest.mark.parametrize("proposer", ["none", "drafter", "ngram"])
def test_each_text_is_what_generate_gives_alone(trained_pair, proposer):
    model, tok, drafter = trained_pair
    kw = {"none": {}, "drafter": {"drafter": drafter}, "ngram": {"ngram": 2}}[proposer]
    limits = [30, 12, 45, 20, 5]
    out = batch_generate(model, tok, PROMPTS, max_tokens=limits, decode_concurrency=3, **kw)
    for i, (p, n) in enumerate(zip(PROMPTS, limits)):
        assert out.texts[i] == generate(model, tok, p, max_tokens=n), f"prompt {i}: batched == alone"
        assert out.finish_reasons[i] in ("length", "stop") and len(out.token_ids[i]) <= n
    if proposer == "drafter":
        assert sum(s.accepted for s in out.stats) > 0, "drafts were accepted in the batch"


def test_seeded_sampling_and_stop_strings(trained_pair):
    model, tok, drafter = trained_pair
    want = [generate(model, tok, p, max_tokens=24, temp=0.9, seed=11 + i) for i, p in enumerate(PROMPTS[:3])]
    requests = [Request(tok.encode(p), max_tokens=24, seed=11 + i, sampling=Request((1,)).sampling.with_temp(0.9))
                for i, p in enumerate(PROMPTS[:3])]
    out = batch_generate(model, tok, requests, drafter=drafter)
    assert out.texts == want, "a seeded request gives plain sampling's text in a batch"
    full = generate(model, tok, PROMPTS[0], max_tokens=40)
    stop = full[8:12]
    cut = batch_generate(model, tok, PROMPTS[:2], drafter=drafter, max_tokens=40, stop=[stop])
    assert cut.texts[0] == full[: full.index(stop)] and cut.finish_reasons[0] == "stop", "cut at its stop string"


def test_bad_lengths_are_refused(trained_pair):
    model, tok, _ = trained_pair
    with pytest.raises(ValueError, match="max_tokens has 2 entries for 3 prompts"):
        batch_generate(model, tok, PROMPTS[:3], max_tokens=[4, 4])


@pytest.mark.parametrize("one", ["def f(x):", [5, 6, 7]])
def test_one_prompt_is_not_a_list_of_prompts(trained_pair, one):
    """A text is a sequence of characters and token ids a sequence of ints: neither is read as prompts."""
    model, tok, _ = trained_pair
    with pytest.raises(TypeError, match="a list of prompts"):
        batch_generate(model, tok, one, max_tokens=2)


def test_auto_draft_lengths_stay_exact(trained_pair):
    """num_draft_tokens="auto": the batch policy picks each round's k from this machine's costs at the
    batch's width (measured on first need); only speed may change."""
    model, tok, drafter = trained_pair
    out = batch_generate(model, tok, PROMPTS[:4], drafter=drafter, max_tokens=24, num_draft_tokens="auto")
    assert out.texts == [generate(model, tok, p, max_tokens=24) for p in PROMPTS[:4]], "auto in a batch is exact"
