"""Many clients at once: the server decodes concurrent requests together, each with its own drafts, and
each gets what it would get alone (greedy and seeded: the same text; unseeded: a complete answer), whether
it streams or not, drafts or not, asks for logprobs or stop strings, and whoever else is running."""

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from mlx_spec import generate
from serving import serving, templated_pair

MAX_TOKENS = 40
PROMPTS = ["import os\nimport sys\n\ndef main(argv):\n", "class Stack:\n    def __init__(self):\n",
           "def fibonacci(n):\n", "for i in range(10):\n", "import json\n\ndef load(path):\n",
           "def parse(line):\n    ", "x = [i * i for i in range(", "with open(path) as f:\n"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pair = templated_pair(tmp_path_factory.mktemp("batch_server"))
    with serving(pair, max_tokens=MAX_TOKENS, decode_concurrency=8, prompt_cache_slots=4,
                 num_draft_tokens=3) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="x", max_retries=0,
                               timeout=120)
        yield client, srv, pair[0], pair[1]


def ask(client, i: int):
    """Request i of eight different ones: completions and chat, streamed or not, greedy, seeded or unseeded,
    drafting on or off. Returns (the text, the settings it was asked with)."""
    prompt = PROMPTS[i]
    settings = dict(temperature=0.0 if i % 3 == 0 else 0.8, seed=None if i % 3 == 2 else 100 + i)
    settings["seed"] = None if settings["temperature"] == 0 else settings["seed"]
    draft, stream, chat = i % 2 == 0, i % 4 in (1, 2), i >= 4
    extra = {"draft": draft}
    if chat:
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, stream=stream,
                                           extra_body=extra, **settings)
        text = "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, stream=stream,
                                      extra_body=extra, **settings)
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
    return text, dict(settings, chat=chat)


def alone(model, tokenizer, i: int, settings: dict) -> str:
    prompt = PROMPTS[i]
    if settings["chat"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
    return generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, temp=settings["temperature"],
                    seed=settings["seed"])


def watch_health(srv, seen: list, stop: threading.Event) -> None:
    url = f"http://127.0.0.1:{srv.server_port}/health"
    while not stop.is_set():
        seen.append(json.loads(urllib.request.urlopen(url, timeout=10).read())["running"])
        time.sleep(0.02)


def test_eight_concurrent_clients_each_get_what_they_would_alone(served):
    client, srv, model, tokenizer = served
    seen, stop = [], threading.Event()
    watcher = threading.Thread(target=watch_health, args=(srv, seen, stop), daemon=True)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(client, i), range(8)))
    stop.set()
    watcher.join()
    assert max(seen) >= 2, f"requests decoded together (rows seen running: {sorted(set(seen))})"
    for i, (text, settings) in enumerate(answers):
        if settings["seed"] is None and settings["temperature"] > 0:
            assert text, f"request {i} (unseeded sampling) got an answer"
            continue
        assert text == alone(model, tokenizer, i, settings), \
            f"request {i} ({settings}) in a batch differs from the same request alone"


def test_stop_strings_and_logprobs_per_request(served):
    """Two requests at once: one cut at a stop string, one with logprobs; each as alone."""
    client, srv, model, tokenizer = served
    prompt = PROMPTS[2]
    full = generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
    stop = full[10:14]

    def cut():
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         stop=[stop]).choices[0]

    def scored():
        return client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0,
                                         logprobs=2).choices[0]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(cut), pool.submit(scored)
        a, b = a.result(), b.result()
    assert a.text == full[: full.index(stop)] and a.finish_reason == "stop", "cut before its stop string"
    assert len(b.logprobs.tokens) == 8 and b.text == generate(model, tokenizer, PROMPTS[3], max_tokens=8)


def test_follow_ups_reuse_their_own_slot_while_others_run(served):
    """Concurrent conversations keep their own prompt-cache slots: each follow-up reuses its conversation's
    K/V and still answers as from scratch."""
    client, srv, model, tokenizer = served

    def conversation(i):
        out = []
        for turn in range(2):
            prompt = PROMPTS[i] + "".join(out)
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            out.append(r.choices[0].text)
            assert r.choices[0].text == generate(model, tokenizer, prompt, max_tokens=12), \
                f"conversation {i} turn {turn} as from scratch"
        return r.usage.prompt_tokens_details.cached_tokens

    with ThreadPoolExecutor(3) as pool:
        cached = list(pool.map(conversation, range(3)))
    assert sum(1 for c in cached if c > 0) >= 2, f"follow-ups reused their slots (cached tokens {cached})"


def test_clients_asking_for_trees_get_what_they_would_alone(served):
    """Per-request "tree_nodes": rows verifying trees beside chain rows in the same batch, greedy and seeded,
    each with the text it would get alone, and its trees counted in its "speculative" report."""
    client, srv, model, tokenizer = served

    def ask_tree(i: int):
        temp, seed = (0.0, None) if i % 2 == 0 else (0.8, 300 + i)
        r = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=temp,
                                      seed=seed, extra_body={"tree_nodes": 4 if i < 4 else 0})
        return r.choices[0].text, temp, seed, r.model_extra.get("speculative") or {}

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask_tree, range(6)))
    for i, (text, temp, seed, spec) in enumerate(answers):
        want = generate(model, tokenizer, PROMPTS[i], max_tokens=MAX_TOKENS, temp=temp, seed=seed)
        assert text == want, f"request {i} (tree_nodes {spec.get('tree_nodes')}) differs from its answer alone"
        if i < 4:
            assert spec.get("tree_nodes") == 4 and spec.get("tree_rounds", 0) > 0, f"request {i} verified trees: {spec}"
        else:
            assert spec.get("tree_rounds", 0) == 0, f"request {i} drafted chains: {spec}"
