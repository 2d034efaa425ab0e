"""mlx_spec.server over real HTTP on loopback, driven by the official `openai` client (and raw sockets for
what a well-behaved client never does): greedy output == mlx_spec.generate, streaming == non-streaming,
bad requests get 4xx with a message, a client that leaves stops its generation, concurrent requests queue."""

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import TINY_CODE
from mlx_spec import generate
from mlx_spec import server as server_mod
from mlx_spec.proposers import make_proposer
from serving import serving, templated_pair

MAX_REQUEST_BYTES = 64 * 1024
MAX_TOKENS = 24
CODE = "import os\nimport sys\n\ndef main(argv):\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(openai client, server, model, tokenizer): the tiny pair served with the MTP drafter on."""
    model, tokenizer, proposer = pair = templated_pair(tmp_path_factory.mktemp("server"))
    with serving(pair, max_tokens=MAX_TOKENS, max_request_bytes=MAX_REQUEST_BYTES) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="x", max_retries=0,
                               timeout=60)
        yield client, srv, model, tokenizer


def chat_text(tokenizer, content):
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def post(srv, path, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload) if payload else None


@pytest.mark.parametrize("draft", [True, False], ids=["mtp", "plain"])
def test_chat_greedy_equals_generate(served, draft):
    client, _, model, tokenizer = served
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CODE}], temperature=0,
                                       max_tokens=MAX_TOKENS, extra_body={"draft": draft})
    want = generate(model, tokenizer, chat_text(tokenizer, CODE), max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == want, "served greedy chat == mlx_spec.generate"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS
    spec = r.model_extra["speculative"]
    assert set(spec) >= {"rounds", "drafted", "accepted", "tau", "acceptance_rate", "acceptance_by_position",
                         "proposer"}
    if draft:
        assert spec["proposer"] == "mtp" and spec["rounds"] > 0 and spec["tau"] > 1, "the drafter was used"
    else:
        assert spec["proposer"] is None and spec["rounds"] == 0, "draft: false decodes plainly"


def test_chat_stream_equals_non_stream(served):
    client, _, model, tokenizer = served
    want = generate(model, tokenizer, chat_text(tokenizer, CODE), max_tokens=MAX_TOKENS)
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CODE}],
                                                 temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want, "streamed deltas add up to the greedy text"
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["speculative"]["proposer"] == "mtp", "the last chunk carries the speculative stats"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS, "include_usage chunk"
    assert len({c.id for c in chunks}) == 1


def test_completions_stream_and_not(served):
    client, _, model, tokenizer = served
    want = generate(model, tokenizer, CODE, max_tokens=MAX_TOKENS)
    r = client.completions.create(model="tiny", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"num_draft_tokens": 5})
    assert r.choices[0].text == want and r.object == "text_completion"
    assert len(r.model_extra["speculative"]["acceptance_by_position"]) == 5, "num_draft_tokens per request"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == want
    ids = tokenizer.encode(CODE)
    assert client.completions.create(model="tiny", prompt=ids, max_tokens=MAX_TOKENS).choices[0].text == want, \
        "a prompt of token ids is the same prompt"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(served, stream):
    client, _, model, tokenizer = served
    want = generate(model, tokenizer, CODE, max_tokens=MAX_TOKENS)
    stop = want.strip("\n").split("\n")[0][-3:]  # ends the first generated line
    cut = want[: want.find(stop)]
    r = client.completions.create(model="tiny", prompt=CODE, max_tokens=MAX_TOKENS, stop=[stop, "never"],
                                  stream=stream)
    chunks = list(r) if stream else [r]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == cut, "the text ends before the first stop string"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_models_and_health(served):
    client, srv, _, _ = served
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "num_draft_tokens": 99}, "num_draft_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
])
def test_malformed_requests_get_400(served, body, param):
    status, err = post(served[1], "/v1/chat/completions", body)
    assert status == 400, "a malformed request is a 400"
    assert err["error"]["message"] and err["error"]["param"] == param, "the error says what is wrong"


def test_openai_client_sees_400_message(served):
    client = served[0]
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_p=0)


def test_too_long_for_the_context(served):
    client, srv, _, _ = served
    prompt = [5] * 2000  # the fixture's context is 2048 tokens
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=100)
    status, err = post(srv, "/v1/completions", {"prompt": [5] * 3000})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_oversized_body_is_refused(served):
    client, srv, _, _ = served
    status, err = post(srv, "/v1/completions", {"prompt": "x" * (2 * MAX_REQUEST_BYTES)})
    assert status == 413 and "--max-request-bytes" in err["error"]["message"]
    assert client.completions.create(model="tiny", prompt=CODE, max_tokens=4).choices[0].text, "still serving"


def wait_finished(srv, n_before, timeout=20.0):
    deadline = time.time() + timeout
    while len(srv.worker.finished) <= n_before and time.time() < deadline:
        time.sleep(0.02)
    assert len(srv.worker.finished) > n_before, "the generation ended"
    return srv.worker.finished[-1]


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(served, stream):
    client, srv, model, tokenizer = served
    n_before = len(srv.worker.finished)
    body = json.dumps({"prompt": CODE, "max_tokens": 1900, "stream": stream, "draft": False}).encode()
    sock = socket.create_connection(("127.0.0.1", srv.server_port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    if stream:
        seen = b""
        while b"data: " not in seen:
            piece = sock.recv(4096)
            assert piece, f"the stream started: {seen!r}"
            seen += piece
    sock.close()  # mid-stream (or while waiting for a whole completion)
    result = wait_finished(srv, n_before)
    assert result.finish_reason == "cancelled" and result.completion_tokens < 1900, \
        "a client that leaves stops its generation"
    r = client.completions.create(model="tiny", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == generate(model, tokenizer, CODE, max_tokens=MAX_TOKENS), "the server keeps serving"


def test_concurrent_requests_queue(served):
    client, srv, model, tokenizer = served
    prompts = [CODE, "class Parser:\n", "def test_", "for i in range(10):\n", "import json\n"]
    want = [generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in prompts]

    def ask(i):
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=MAX_TOKENS,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert got == want, "concurrent greedy requests give the single-request outputs"


def test_cli_user_mistakes_print_one_line(served, capsys):
    _, srv, _, _ = served
    path = str(TINY_CODE / "base")
    cases = [(["--model", path, "--max-request-bytes", "0"], "--max-request-bytes"),
             (["--model", path, "--prompt-cache-slots", "0"], "--prompt-cache-slots"),
             (["--model", "/nonexistent/model"], "does not exist"),
             (["--model", path, "--port", str(srv.server_port)], "choose another --port")]
    for argv, message in cases:
        rc = server_mod.main(argv + ["--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_a_client_gone_during_the_prefill_stops_it_there(served, monkeypatch):
    """The worker hands the job's cancel flag to the engine as should_stop: a request cancelled while its
    prompt is being read ends before the next prefill chunk, with no tokens, reported as cancelled."""
    from mlx_spec import engine as engine_mod
    from mlx_spec.server import GenerationRequest, Job, Worker

    _, srv, model, tokenizer = served
    asked = []
    real_init = engine_mod.Engine.__init__

    def small_chunks(self, *a, **kw):
        real_init(self, *a, **{**kw, "prefill_step": 8})
        stop = self.should_stop
        self.should_stop = lambda: asked.append(1) or stop()

    monkeypatch.setattr(engine_mod.Engine, "__init__", small_chunks)
    job = Job(GenerationRequest(kind="text", prompt=CODE * 4, max_tokens=50, draft=False))
    job.cancelled.set()
    worker = Worker(model, tokenizer, max_context=2048, max_tokens=50)  # driven here, not as a thread
    worker._start(job)  # as run_now, but without cancelling the ticket: the engine's should_stop must see it
    while not worker.scheduler.idle:
        worker.scheduler.step()
    events = [job.events.get_nowait() for _ in range(job.events.qsize())]
    result = next(value for kind, value in events if kind == "done")
    assert not [e for e in events if e[0] == "text"]
    assert asked == [1], "asked once, before the first chunk"
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0


@pytest.mark.parametrize("draft", [True, False], ids=["mtp", "plain"])
def test_a_follow_up_request_prefills_only_what_is_new(served, draft):
    """A chat client resends the conversation: the server keeps the last request's K/V, reports the reused
    part as usage.prompt_tokens_details.cached_tokens, and answers exactly as from scratch."""
    client, srv, model, tokenizer = served
    messages = [{"role": "user", "content": CODE}]
    for turn, follow_up in enumerate(["def main():\n", "class Config:\n"]):
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                           extra_body={"draft": draft})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert r.choices[0].message.content == generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if turn:
            assert cached > r.usage.prompt_tokens // 2, f"the conversation so far came from the cache ({cached})"
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": follow_up}]
    r = client.completions.create(model="tiny", prompt="import json\n", max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens <= 1, "an unrelated prompt starts over"


@pytest.mark.parametrize("enabled", [True, False])
def test_no_prompt_cache_prefills_everything(served, enabled):
    import mlx.core as mx

    from mlx_spec.server import Worker

    _, _, model, tokenizer = served
    cache = Worker(model, tokenizer, None, max_context=None, max_tokens=8,
                   prompt_cache=enabled).conversations.prompt_cache
    slot, reused = cache.prepare([5, 6, 7])
    assert reused == 0
    model(mx.array([[5, 6, 7]]), cache=slot.cache)  # what a request's prefill leaves
    cache.settle(slot, [5, 6, 7], torn=False)
    assert cache.prepare([5, 6, 7, 8])[1] == (3 if enabled else 0), "--no-prompt-cache: nothing is reused"


def test_draft_model_server_keeps_its_draft_cache_between_requests(served):
    """With --draft-model, each prompt-cache slot holds its own draft-model proposer (and so its cache): a
    follow-up continues both caches, and two conversations alternating in two slots do not disturb each
    other's."""
    from mlx_spec.server import GenerationRequest, Job, Worker

    _, _, model, tokenizer = served
    worker = Worker(model, tokenizer, make_proposer(model, draft_model=model), max_context=None,
                    max_tokens=MAX_TOKENS, prompt_cache_slots=2)
    assert worker.proposer == "draft_model"

    def ask(prompt):
        job = Job(GenerationRequest(kind="text", prompt=prompt, max_tokens=MAX_TOKENS))
        worker.run_now(job)
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        text = "".join(v for k, v in events if k == "text")
        result = next(v for k, v in events if k == "done")
        assert text == generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
        assert result.speculative["rounds"] > 0 and result.speculative["proposer"] == "draft_model"
        return text, result, worker.conversations.prompt_cache.latest.proposer

    other = "class Parser:\n    def __init__(self"
    text_a, _, proposer_a = ask(CODE)
    text_b, _, proposer_b = ask(other)
    assert proposer_a is not proposer_b, "a proposer per conversation"
    held = proposer_a.consumed
    _, result, again = ask(CODE + text_a + "\n")
    assert again is proposer_a and held > 0 and result.cached_tokens > 0, "A's base and draft caches carried on"
    _, result, again = ask(other + text_b + "\n")
    assert again is proposer_b and result.cached_tokens > 0, "... and B's"


def test_two_clients_alternating_keep_their_caches_with_two_slots(served):
    from mlx_spec.server import GenerationRequest, Job, Worker

    _, _, model, tokenizer = served
    worker = Worker(model, tokenizer, None, max_context=None, max_tokens=MAX_TOKENS, prompt_cache_slots=2)

    def ask(prompt):
        job = Job(GenerationRequest(kind="text", prompt=prompt, max_tokens=MAX_TOKENS))
        worker.run_now(job)
        events = [job.events.get_nowait() for _ in range(job.events.qsize())]
        text = "".join(v for k, v in events if k == "text")
        assert text == generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS), "as from scratch"
        return text, next(v for k, v in events if k == "done").cached_tokens

    a, _ = ask(CODE)
    b, _ = ask("class Parser:\n    def __init__(self")
    _, cached_a = ask(CODE + a + "\n")
    _, cached_b = ask("class Parser:\n    def __init__(self" + b + "\n")
    assert cached_a > 10 and cached_b > 10, "each conversation found its own cache"


def test_random_follow_ups_cancels_and_proposers_always_answer_as_from_scratch(served):
    """State carried between requests (prompt-cache slots, the draft model's cache, auto's learnt state) must
    never change an answer: conversations that share prefixes, follow-ups, requests cancelled mid-prefill
    or stopped early by a stop string, drafting on and off, each checked against generate() from scratch."""
    import random

    from mlx_spec.server import GenerationRequest, Job, Worker

    _, _, model, tokenizer = served
    rng = random.Random(0)
    seeds = ["def parse(line):\n", "class Config:\n    def __init__(self", "import os\nimport sys\n"]
    for draft in (make_proposer(model, draft_model=model), None):
        worker = Worker(model, tokenizer, draft, max_context=None, max_tokens=12, prompt_cache_slots=2)
        history = {s: s for s in seeds}
        for step in range(14):
            seed = rng.choice(seeds)
            prompt = history[seed]
            req = GenerationRequest(kind="text", prompt=prompt, max_tokens=12, draft=draft is not None
                                    and rng.random() < 0.8, num_draft_tokens=rng.choice([1, 3, "auto"]))
            action = rng.choice(["plain", "plain", "cancel", "stop"])
            if action == "stop":
                req.stop = ["\n"]
            job = Job(req)
            if action == "cancel":
                job.cancelled.set()
            worker.run_now(job)
            events = [job.events.get_nowait() for _ in range(job.events.qsize())]
            text = "".join(v for k, v in events if k == "text")
            want = generate(model, tokenizer, prompt, max_tokens=12)
            if action == "cancel":
                assert text == "", f"step {step}: cancelled before its prefill"
            elif action == "stop":  # the engine ran past what the client received: the caches must not keep it
                assert want.startswith(text) and "\n" not in text, f"step {step}: stopped at the stop string"
            else:
                assert text == want, f"step {step} ({draft and 'draft model'}, {req.num_draft_tokens}): as from scratch"
            if action != "cancel":  # the client continues the conversation with what it received
                history[seed] = prompt + text + rng.choice(["\n", "\n    ", "\n\n# ", ""])
