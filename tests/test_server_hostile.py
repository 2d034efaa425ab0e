"""mlx_spec.server against hostile clients, over real loopback sockets: a client that stalls, floods
connections, sends malformed or pathological JSON, a template of its own, invalid Unicode or a huge
prompt gets a 4xx/5xx answer or a closed connection within a bounded time, and well-formed requests from
everyone else are still answered correctly. Also logprobs in OpenAI's shapes, and the served model name."""

import http.client
import json
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import TINY_CODE
from mlx_spec import generate, stream_generate
from serving import serving as serve
from serving import templated_pair

CODE = "import os\nimport sys\n\ndef main(argv):\n"
MAX_TOKENS = 12
TIMEOUT = 1.0  # the test servers' --request-timeout


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return templated_pair(tmp_path_factory.mktemp("hostile"))


def serving(pair, **kw):
    """The shared helper with this file's limits: a short --request-timeout, few connections, small bodies."""
    return serve(pair, **{"max_tokens": MAX_TOKENS, "request_timeout": TIMEOUT, "max_connections": 8,
                          "max_request_bytes": 64 * 1024, **kw})


@pytest.fixture(scope="module")
def srv(pair):
    with serving(pair) as s:
        yield s


def post(srv, path, body, timeout=30):
    """(status, JSON body, headers) of a well-formed POST."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, (json.loads(payload) if payload else None), dict(r.getheaders())


def raw(srv, data: bytes, timeout=10.0) -> bytes:
    """Send bytes, read until the server closes (or `timeout`, which fails the test)."""
    with socket.create_connection(("127.0.0.1", srv.server_port), timeout=timeout) as s:
        s.sendall(data)
        return read_to_end(s)


def read_to_end(s) -> bytes:
    out = b""
    while True:
        piece = s.recv(65536)
        if not piece:
            return out
        out += piece


def stalled(srv, how: str) -> socket.socket:
    """A connection that never completes its request: silent, half a header, or a short body."""
    s = socket.create_connection(("127.0.0.1", srv.server_port), timeout=30)
    if how == "headers":
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    elif how == "body":
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    return s


def completion(srv, prompt=CODE, **kw):
    status, body, _ = post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                    **kw})
    assert status == 200, body
    return body["choices"][0]["text"]


# --- 1. the client's template --------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"chat_template": "{{ 'x' * 1000 }}"},  # the server would render the client's Jinja
    {"tools": [{"type": "function"}]},
    {"enable_thinking": "{{ 7 * 7 }}"},
    {"reasoning_effort": "x" * 1000},
])
def test_chat_template_kwargs_take_only_known_switches(srv, kwargs):
    started = time.monotonic()
    status, err, _ = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "chat_template_kwargs": kwargs})
    assert status == 400 and err["error"]["param"] == "chat_template_kwargs", err
    assert time.monotonic() - started < 5, "refused before anything is rendered"


def test_allowed_template_switches_are_passed(srv, pair):
    _, tokenizer, _ = pair
    body = {"messages": [{"role": "user", "content": CODE}], "max_tokens": MAX_TOKENS, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": "low"}}
    status, r, _ = post(srv, "/v1/chat/completions", body)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CODE}], add_generation_prompt=True,
                                           tokenize=False)
    assert status == 200 and r["choices"][0]["message"]["content"] == generate(pair[0], tokenizer, prompt,
                                                                               max_tokens=MAX_TOKENS)


def test_a_huge_prompt_is_refused_before_tokenizing_and_others_are_still_served(pair):
    """Tokenizing megabytes takes the worker many seconds (44 s for 8 MB here) while every other client
    waits; a text that cannot fit the context whatever its tokens is refused without tokenizing."""
    with serving(pair, max_request_bytes=4 << 20, max_context=256) as srv:
        want = completion(srv)
        with ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            huge = pool.submit(post, srv, "/v1/completions", {"prompt": "def f(x):\n" * 300_000})
            time.sleep(0.05)
            other = pool.submit(completion, srv)
            status, err, _ = huge.result()
            assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
            assert other.result() == want, "the well-formed request behind it is answered correctly"
            assert time.monotonic() - started < 8, "and soon (tokenizing the huge one would take ~15 s)"


# --- 2. stalls and floods -----------------------------------------------------------------------

def test_a_partial_body_gets_408_within_the_request_timeout(srv):
    started = time.monotonic()
    reply = raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert reply.startswith(b"HTTP/1.0 408") and b"--request-timeout" in reply, reply[:200]
    assert time.monotonic() - started < TIMEOUT + 3


@pytest.mark.parametrize("how", ["silent", "headers"])
def test_a_stalled_request_line_or_header_is_closed(srv, how):
    started = time.monotonic()
    s = stalled(srv, how)
    s.settimeout(TIMEOUT + 5)
    assert read_to_end(s) == b"", "closed without an answer"
    s.close()
    assert time.monotonic() - started < TIMEOUT + 3


def test_a_dribbling_client_is_cut_at_the_deadline(srv):
    """Each byte within the read timeout, but the whole request must arrive within --request-timeout too."""
    s = socket.create_connection(("127.0.0.1", srv.server_port), timeout=10)
    s.setblocking(False)
    started, reply = time.monotonic(), None
    for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 200:
        try:
            s.sendall(bytes([byte]))
            reply = s.recv(65536)  # b"" (closed) or an answer: the server stopped waiting
            break
        except BlockingIOError:  # nothing yet
            time.sleep(TIMEOUT / 4)
        except OSError:  # reset
            reply = b""
            break
    s.close()
    assert reply is not None and time.monotonic() - started < TIMEOUT + 3, "cut at the deadline"
    assert reply == b"" or reply.startswith(b"HTTP/1.0 408"), reply[:100]


def test_connections_beyond_the_limit_get_503_and_threads_stay_bounded(pair):
    with serving(pair, request_timeout=30, max_connections=4) as srv:
        base_threads = threading.active_count()
        held = [stalled(srv, how) for how in ["silent", "headers", "body", "silent"]]
        time.sleep(0.3)
        extra = [stalled(srv, "silent") for _ in range(12)]  # each gets its 503 at once, no thread
        for s in extra:
            s.settimeout(5)
            reply = read_to_end(s)
            assert reply.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in reply, reply[:200]
            assert b"--max-connections" in reply
            s.close()
        assert threading.active_count() <= base_threads + 4 + 1, "one handler thread per admitted connection"
        status, err, headers = post(srv, "/v1/completions", {"prompt": CODE, "max_tokens": 2})
        assert status == 503 and headers.get("Retry-After") == "1" and err["error"]["type"] == "server_error"
        for s in held:
            s.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the handlers notice the closed sockets and free their slots
            status, _, _ = post(srv, "/v1/completions", {"prompt": CODE, "max_tokens": 2})
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200, "served again once the stalled clients left"
        assert srv.refused >= 13


# --- framing: one way to read a body, and JSON for every refusal --------------------------------------

BODY = b'{"prompt": "x", "max_tokens": 2}'


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 32\r\nContent-Length: 5\r\n", 400),  # which one frames the body? (audit defect 24)
    (b"Content-Length: 32\r\nContent-Length: 32\r\n", 400),  # the same twice: refused too, one rule
    (b"Content-Length: 32\r\nTransfer-Encoding: chunked\r\n", 501),  # a proxy would read it as chunked
    (b"Content-Length: +32\r\n", 400),
])
def test_a_body_framed_two_ways_is_refused_and_the_connection_closed(srv, headers, status):
    reply = raw(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n" + headers + b"\r\n"
                + BODY)  # raw() returns once the server closes: kept alive, this would time out
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"%d" % status, f"refused, not served from either length: {reply[:200]!r}"
    assert json.loads(body)["error"]["message"], "with a JSON error"
    assert completion(srv), "still serving"


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 120 + b"\r\n", 431),
    (b"PUT /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 501),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
])
def test_the_standard_librarys_refusals_have_json_bodies(srv, request_bytes, status):
    reply = raw(srv, request_bytes.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), reply[:200]
    assert b"application/json" in head and json.loads(body)["error"]["message"], \
        f"a JSON body like every other error: {body[:200]!r}"


# --- 3, 4, 8. values the server must refuse with a 400 naming the field --------------------------

@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": -Infinity}', "top_p"),
    (b'{"prompt": "x", "seed": 1e20}', "seed"),
    (b'{"prompt": "x", "seed": "7"}', "seed"),
    (b'{"prompt": "ab\\udc80cd"}', "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "logprobs": true}', "logprobs"),
    (b'{"prompt": "x", "temperature": [[[[1]]]]}', "temperature"),
    (b'{"prompt": "x", "acceptance": {"a": 1}}', "acceptance"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),  # past Python's int digit limit
    (b"[" * 30_000 + b"]" * 30_000, None),  # RecursionError in the JSON parser (100k deep: the same)
    (b'{"prompt": "x", "stop": ' + b"[" * 900 + b"]" * 900 + b"}", "stop"),
])
def test_pathological_values_get_400(srv, body, param):
    status, err, _ = post(srv, "/v1/completions", body)
    assert status == 400, f"a 400, not a 500 or a dropped connection: {err}"
    assert err["error"]["param"] == param and len(err["error"]["message"]) < 400, err


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "ab\\udc80"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}', "top_logprobs"),
])
def test_pathological_chat_values_get_400(srv, body, param):
    status, err, _ = post(srv, "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == param, err


@pytest.mark.parametrize("stream", [False, True])
def test_any_integer_seed_is_mapped_into_range(srv, pair, stream):
    model, tokenizer, _ = pair
    want = generate(model, tokenizer, CODE, max_tokens=MAX_TOKENS, temp=1.0, seed=2**64 - 1)
    for seed in (-1, 2**64 - 1, 2**128 - 1):
        body = {"prompt": CODE, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed, "stream": stream}
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        r = conn.getresponse()
        payload = r.read().decode()
        conn.close()
        assert r.status == 200, payload
        if stream:
            events = [json.loads(line[6:]) for line in payload.splitlines()
                      if line.startswith("data: {")]
            assert not [e for e in events if "error" in e], "no error event mid-stream"
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        else:
            text = json.loads(payload)["choices"][0]["text"]
        assert text == want, f"seed {seed} is seed {seed % 2**64}"


def test_an_internal_error_does_not_leak_its_message(srv, monkeypatch):
    def broken(*a, **k):
        raise TypeError("secret detail /home/someone/models")

    monkeypatch.setattr(srv.worker.conversations, "start", broken)
    status, err, _ = post(srv, "/v1/completions", {"prompt": CODE, "max_tokens": 2})
    assert status == 500 and "secret" not in err["error"]["message"] and "log" in err["error"]["message"]
    monkeypatch.undo()
    assert completion(srv), "still serving"


# --- 8. the served model name --------------------------------------------------------------------

def test_the_model_id_is_never_a_local_path(tmp_path, monkeypatch, capsys):
    from mlx_spec.server import command

    assert command.served_model_name(str(TINY_CODE / "base")) == "base"
    assert command.served_model_name(str(TINY_CODE / "base") + "/") == "base"
    assert command.served_model_name("mlx-community/gemma-4-e2b-it-4bit") == "mlx-community/gemma-4-e2b-it-4bit"
    seen = {}

    class NoListen:
        def __init__(self, *a, model_name, **kw):
            seen["name"] = model_name
            raise OSError(98, "Address already in use")

    monkeypatch.setattr(command, "Server", NoListen)
    assert command.main(["--model", str(TINY_CODE / "base"), "--quiet"]) == 2
    assert seen["name"] == "base"
    assert command.main(["--model", str(TINY_CODE / "base"), "--served-model-name", "gemma", "--quiet"]) == 2
    assert seen["name"] == "gemma"
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [(["--request-timeout", "0"], "--request-timeout"),
                                           (["--request-timeout", "nan"], "--request-timeout"),
                                           (["--max-connections", "0"], "--max-connections"),
                                           (["--decode-concurrency", "0"], "--decode-concurrency"),
                                           (["--prompt-concurrency", "0"], "--prompt-concurrency"),
                                           (["--strict", "--tree-nodes", "4"], "--tree-nodes"),
                                           (["--tree-nodes", "auto", "--num-draft-tokens", "3"], "tree_nodes"),
                                           (["--draft-model", str(TINY_CODE / "base"), "--tree-nodes", "4"],
                                            "--tree-nodes")])
def test_limit_flags_are_checked(argv, message, capsys):
    from mlx_spec.server import command

    assert command.main(["--model", str(TINY_CODE / "base"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


# --- 8. logprobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setup", ["strict", "draft model"])
def test_a_tree_the_server_cannot_verify_is_a_400(setup):
    """A request's "tree_nodes" on a strict server (trees are verified without strict padding) or with a
    draft model (it drafts chains only) is a bad request naming why, never a 500."""
    from mlx_spec import load, load_drafter
    from mlx_spec.proposers import make_proposer
    from mlx_spec.server.requests import GenerationRequest
    from mlx_spec.server.stream import Job
    from mlx_spec.server.worker import Worker

    model, tokenizer = load(str(TINY_CODE / "base"))
    if setup == "strict":
        proposer = make_proposer(model, drafter=load_drafter(str(TINY_CODE / "assistant"), model))
    else:
        proposer = make_proposer(model, draft_model=model)
    worker = Worker(model, tokenizer, proposer, strict=setup == "strict", max_context=256, max_tokens=3)
    job = Job(GenerationRequest(kind="text", prompt=[1, 2, 3], max_tokens=3, tree_nodes=4))
    worker._start(job)
    kind, error = job.events.get_nowait()
    assert kind == "error" and error.status == 400 and "tree" in str(error), (kind, error)
    if setup == "strict":
        assert error.param == "tree_nodes", error.param


def reference_logprobs(pair, prompt, n):
    model, tokenizer, _ = pair
    return [(r.token, r.logprob, r.top_logprobs[:n]) for r in
            stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, logprobs=max(n, 1))]


@pytest.mark.parametrize("draft", [True, False], ids=["mtp", "plain"])
def test_chat_logprobs_in_openai_shape(srv, pair, draft):
    _, tokenizer, _ = pair
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": CODE}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"draft": draft})
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = reference_logprobs(pair, prompt, 3)
    assert len(content) == len(want)
    for got, (token, lp, top) in zip(content, want):
        assert math.isclose(got.logprob, lp, abs_tol=1e-5) and len(got.top_logprobs) == 3
        assert [t.token for t in got.top_logprobs] == [tokenizer.decode([i]) for i, _ in top]
        assert got.bytes == list(got.token.encode())
    streamed = [c for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=3,
        stream=True, extra_body={"draft": draft}) if c.choices and c.choices[0].logprobs]
    assert [t.model_dump() for c in streamed for t in c.choices[0].logprobs.content] == \
        [t.model_dump() for t in content], "streamed logprobs add up to the whole response's"


def test_chat_logprobs_without_alternatives_and_none_unless_asked(srv):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": CODE}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, logprobs=True)
    assert r.choices[0].logprobs.content and all(t.top_logprobs == [] for t in r.choices[0].logprobs.content)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert r.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_in_openai_shape(srv, pair, stream):
    _, tokenizer, _ = pair
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_port}/v1", api_key="x", max_retries=0)
    chunks = client.completions.create(model="tiny", prompt=CODE, max_tokens=MAX_TOKENS, temperature=0, logprobs=2,
                                       stream=stream)
    chunks = [c for c in chunks if c.choices] if stream else [chunks]
    text = "".join(c.choices[0].text for c in chunks)
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    tokens = [t for lp in lps for t in lp.tokens]
    assert "".join(tokens) == text
    assert [o for lp in lps for o in lp.text_offset] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    want = reference_logprobs(pair, CODE, 2)
    got = [v for lp in lps for v in lp.token_logprobs]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, (_, b, _) in zip(got, want)) and len(got) == len(want)
    tops = [d for lp in lps for d in lp.top_logprobs]
    assert all(len(d) <= 2 for d in tops) and list(tops[0]) == [tokenizer.decode([i]) for i, _ in want[0][2]]


def logprob_tokens(srv, kind, stream, **body):
    """(text, [(token, text_offset)]) of a greedy request with logprobs, streamed or not, over raw HTTP."""
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    body = dict(body, max_tokens=MAX_TOKENS, temperature=0, stream=stream)
    if kind == "chat":
        body.update(messages=[{"role": "user", "content": CODE}], logprobs=True, top_logprobs=1)
    else:
        body.update(prompt=CODE, logprobs=1)
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=30)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read().decode()
    conn.close()
    assert r.status == 200, payload
    choices = [json.loads(line[6:])["choices"] for line in payload.splitlines() if line.startswith("data: {")] \
        if stream else [json.loads(payload)["choices"]]
    choices = [c[0] for c in choices if c]
    if kind == "chat":
        text = "".join((c.get("delta") or c.get("message") or {}).get("content") or "" for c in choices)
        tokens, offset = [], 0
        for c in choices:
            for t in (c["logprobs"] or {}).get("content") or []:
                tokens.append((t["token"], offset))  # chat has no text_offset: tokens follow one another
                offset += len(t["token"])
        return text, tokens
    text = "".join(c["text"] for c in choices)
    return text, [pair for c in choices if c["logprobs"] for pair in zip(c["logprobs"]["tokens"],
                                                                          c["logprobs"]["text_offset"])]


@pytest.mark.parametrize("kind", ["text", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_stop_where_a_stop_string_cuts_the_text(srv, kind, stream):
    """A stop string that begins inside a token: that token is kept (some of its text is sent), the tokens
    after it (the stop string's) are not, and every text_offset lies within the text."""
    full, tokens = logprob_tokens(srv, kind, stream)
    assert "".join(t for t, _ in tokens) == full
    k = next(i for i, (t, o) in enumerate(tokens[:-1]) if len(t) >= 2 and full.find(t[1:] + tokens[i + 1][0]) == o + 1)
    token, offset = tokens[k]
    stop = token[1:] + tokens[k + 1][0]  # starts after the first character of token k, ends in token k + 1
    text, kept = logprob_tokens(srv, kind, stream, stop=[stop])
    assert text == full[: offset + 1], "the text ends where the stop string begins"
    assert kept == tokens[: k + 1], "the logprobs end with the last token whose text starts before the cut"
    assert all(o < len(text) for _, o in kept), "every text_offset lies within the text"


# --- 9. load: well-formed requests answered while stalled connections are held -------------------

PROMPTS = [CODE, "class Parser:\n", "def test_", "for i in range(10):\n", "import json\n"]


@pytest.mark.parametrize("n_sequential, n_concurrent, n_stalled", [
    pytest.param(50, 20, 20, marks=pytest.mark.slow, id="50+20+20"),
    pytest.param(6, 5, 5, id="6+5+5"),
])
def test_load_with_stalled_connections(pair, n_sequential, n_concurrent, n_stalled):
    model, tokenizer, _ = pair
    want = {p: generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS}
    with serving(pair, request_timeout=120, max_connections=64) as srv:
        held = [stalled(srv, ("silent", "headers", "body")[i % 3]) for i in range(n_stalled)]
        started = time.monotonic()
        for i in range(n_sequential):
            p = PROMPTS[i % len(PROMPTS)]
            assert completion(srv, p, draft=i % 2 == 0) == want[p], f"sequential request {i}"

        def ask(i):
            p = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                status, r, _ = post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": p}],
                                                                  "max_tokens": MAX_TOKENS, "temperature": 0})
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                       tokenize=False)
                return status == 200 and r["choices"][0]["message"]["content"] == generate(
                    model, tokenizer, prompt, max_tokens=MAX_TOKENS)
            return completion(srv, p) == want[p]

        with ThreadPoolExecutor(n_concurrent) as pool:
            assert all(pool.map(ask, range(n_concurrent))), "every concurrent request answered correctly"
        assert all(s.fileno() >= 0 for s in held) and srv.refused == 0
        for s in held:  # still open on the server's side: it answers nothing and has not closed them
            s.settimeout(0.01)
            with pytest.raises((socket.timeout, BlockingIOError)):
                s.recv(1)
            s.close()
        assert time.monotonic() - started < 600
