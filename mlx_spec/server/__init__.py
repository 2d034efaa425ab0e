"""`mlx_spec.server`: an OpenAI-compatible HTTP server with speculative decoding.

    mlx_spec.server --model M [--drafter D | --draft-model M2 | --ngram [N]] [--host 127.0.0.1] [--port 8080]
                    [--max-tokens N] [--num-draft-tokens K|auto] [--no-draft] [--max-context N]
                    [--max-request-bytes B] [--request-timeout S] [--max-connections N]
                    [--served-model-name NAME] [--no-prompt-cache] [--prompt-cache-slots N]
                    [--decode-concurrency N] [--prompt-concurrency N]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both stream with server-sent events when
"stream": true), GET /v1/models, GET /health. Besides OpenAI's fields (logprobs included) a request may set
"draft" (bool) and "num_draft_tokens"; every response carries "usage" and a "speculative" object (rounds,
drafted, accepted, tau, acceptance_rate, acceptance_by_position, plain_steps, proposer).

One worker thread owns the model: it tokenizes requests in arrival order and decodes up to
--decode-concurrency of them together in continuous batches, each speculating with its own drafts and
getting exactly what it would get alone (worker.py, batch/); it keeps recent requests' K/V so that a
follow-up (the same conversation, resent) prefills only what is new (usage.prompt_tokens_details
.cached_tokens; --no-prompt-cache turns it off). GET /health says how many requests run and wait.
HTTP handler threads (standard library only) parse and validate requests, queue them, and write out what
the worker produces; a client that goes away cancels its request, queued or running. What the server
refuses from a hostile client, and how: http.py and requests.py.
"""

from .command import build_parser, main
from .http import Handler, Server
from .requests import GenerationRequest, RequestDefaults, RequestError, parse_request
from ..stops import StopMatcher
from .worker import Job, JobResult, TokenLogprob, Worker

__all__ = ["Server", "Handler", "Worker", "Job", "JobResult", "StopMatcher", "TokenLogprob", "GenerationRequest",
           "RequestDefaults", "RequestError", "parse_request", "build_parser", "main"]
