"""Public Python API: load, load_drafter, generate, stream_generate (mirrors mlx-lm's names and shapes).

Thin: it turns text into token ids, resolves the caller's proposer, sampling and draft-length choices once,
runs an `Engine`, and turns token ids back into text with mlx-lm's streaming detokenizer. The library
default is stateless and silent: a fixed k, and a fresh seed per call unless one is given.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .engine import Engine, TokenEvent
from .errors import MlxSpecError, PairingError
from .checkpoint import read_config
from .distributed.loading import share_drafter
from .distributed.requests import agree_request, checked
from .loading import is_hub_id, load_model, load_tokenizer, resolve_model_path
from .families import checkpoint_type, drafter_types, for_type
from .memory import resident
from .models.base import as_base
from .paths import cache_root
from .proposers import make_proposer
from .proposers.base import Proposer
from .request import Request
from .stats import GenerationStats
from .stops import StopMatcher
from .tuning.costs import K_MAX
from .draft_policy import DraftPolicy, FixedK
from .tuning.tuner import AutoTuner, draft_policy

STRICT_ROWS = K_MAX + 1  # strict mode pads every decode pass to this many rows: a verify of auto's largest k

Prompt = Union[str, List[int]]


@dataclass
class GenerationResponse:
    """One streamed step. `text` is the new text segment (may be empty mid-character); `from_draft` says
    whether the token was a draft the base accepted (False for the base's own bonus token). With
    `logprobs=N`: `logprob` is log p(token) under the base model (temperature 1, after logits processors)
    and `top_logprobs` the N most likely [(token id, log p)], best first; None otherwise."""

    text: str
    token: int
    from_draft: bool
    stats: GenerationStats
    finish_reason: Optional[str] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None

    # mlx-lm's GenerationResponse field names, so code written for it keeps working
    @property
    def prompt_tokens(self) -> int:
        return self.stats.prompt_tokens

    @property
    def prompt_tps(self) -> float:
        return self.stats.prompt_tps

    @property
    def generation_tokens(self) -> int:
        return self.stats.generation_tokens

    @property
    def generation_tps(self) -> float:
        return self.stats.generation_tps

    @property
    def peak_memory(self) -> float:
        return self.stats.peak_memory_bytes / 1e9


def _model_dir(path_or_repo: str, q_bits: Optional[int]) -> str:
    """An unconverted hub checkpoint is converted (and quantized) once into our cache; later loads reuse it.
    Local directories and MLX-layout repos (mlx-community's) load as they are."""
    if not is_hub_id(path_or_repo):
        return path_or_repo
    from .checkpoint import is_mlx_layout, read_config

    downloaded = resolve_model_path(path_or_repo)
    if is_mlx_layout(downloaded, read_config(downloaded)):
        return str(downloaded)
    dest = cache_root() / "models" / (path_or_repo.replace("/", "--") + (f"-{q_bits}bit" if q_bits else ""))
    if not (dest / "config.json").exists():
        from convert import convert

        convert(downloaded, dest, quantize=bool(q_bits), q_bits=q_bits or 4)
    return str(dest)


def load(path_or_repo: str, dtype: Optional[str] = None, q_bits: Optional[int] = None):
    """Load (model, tokenizer) from a local directory, a .gguf file or a hub repo id.

    MLX-layout directories (ours, mlx-lm's, mlx-community's) load as they are; an unconverted Hugging Face
    directory is sanitized and cast in memory. A hub repo id is downloaded through huggingface_hub (its
    cache; HF_HUB_OFFLINE is honoured); an unconverted one is converted once into ~/.cache/mlx_spec, and
    quantized to `q_bits` if given, so the next start is fast. `dtype` ("float16", "bfloat16",
    "float32") casts the float weights; by default a quantized model runs in float32 on MLX's CPU backend
    (its half-precision quantized matmul is ~9-40x slower) and as stored everywhere else.
    """
    if str(path_or_repo).endswith(".gguf"):  # llama-architecture GGUF (e.g. SmolLM2), tokenizer inside
        from .gguf import load_gguf

        return load_gguf(path_or_repo, dtype)
    model, config, model_dir = load_model(_model_dir(str(path_or_repo), q_bits), dtype=dtype)
    return model, load_tokenizer(model_dir, config)


def load_drafter(path_or_repo: str, base, base_path: Optional[str] = None, dtype: Optional[str] = None):
    """Load a drafter and check that it fits `base`; raises PairingError on a mismatch. The family comes
    from its config (families.py): a Gemma 4 MTP assistant (gemma4_assistant, gemma4_unified_assistant), a
    z-lab DFlash or a DeepSeek DSpark block drafter (gemma4_dflash, gemma4_dspark), or an EAGLE-3 drafter in
    the Speculators layout; `drafter.describe()` says which.
    "auto" finds the base's published drafter from `base_path` (drafting.find_auto_drafter)."""
    from .drafting import find_auto_drafter

    if path_or_repo == "auto":
        path_or_repo = find_auto_drafter(base_path)
    model_dir = _model_dir(str(path_or_repo), None)
    config = read_config(resolve_model_path(model_dir))
    kind = checkpoint_type(config)
    family = for_type(kind)
    if family is None:
        raise PairingError(
            f"{Path(model_dir) / 'config.json'} is a {kind!r} model, not a drafter "
            f"({', '.join(drafter_types())}); for an ordinary small model use --draft-model"
        )
    drafter, _, _ = load_model(model_dir, dtype=dtype)
    share_drafter(drafter, base)  # a base sharded over ranks: the drafter reads what this rank holds
    family.check_pairing(drafter, base)
    return drafter


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids for a prompt given as text or ids; adds BOS unless the text already starts with it."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def make_request(tokenizer, prompt: Union[Prompt, Request], **settings) -> Request:
    """The Request for an API call: a Request as given, or one built from a prompt (text or ids) and
    keywords (the Request's field names, and mlx-lm's temp/top_p/top_k/min_p/acceptance and
    kv_bits/kv_group_size/quantized_kv_start)."""
    if isinstance(prompt, Request):
        if settings:
            raise TypeError(f"settings go in the Request, not beside it: {sorted(settings)}")
        return prompt.validate()
    return Request.build(encode_prompt(tokenizer, prompt), **settings)


def make_engine(model, request: Request, *, eos_ids: Sequence[int] = (), proposer: Optional[Proposer] = None,
                drafter=None, draft_model=None, ngram: Optional[int] = None, policy: Optional[DraftPolicy] = None,
                tuner: Optional[AutoTuner] = None, prompt_cache: Optional[list] = None,
                should_stop: Optional[Callable[[], bool]] = None,
                on_prefill: Optional[Callable[[int, int], None]] = None) -> Engine:
    """The Engine that decodes `request`: its proposer (none when the request does not draft, or k is 0),
    its draft policy (`policy`, else from request.num_draft_tokens: a fixed k, or `tuner`'s auto policy) and
    strict mode's row count on this device."""
    proposer = make_proposer(model, proposer=proposer, drafter=drafter, draft_model=draft_model, ngram=ngram)
    if proposer is not None and request.draft:
        policy = policy or draft_policy(request.num_draft_tokens, model, proposer, tuner, request.kv,
                                        request.tree_nodes)
    else:
        policy = None
    if policy is None:
        proposer = None  # plain decoding (a draft model is not even prefilled)
    rows = strict_rows(model, policy) if request.strict else None
    eng = Engine(model, request, proposer=proposer, policy=policy, eos_ids=eos_ids, cache=prompt_cache,
                 should_stop=should_stop, strict_rows=rows, on_prefill=on_prefill)
    eng.stats.strict = request.strict
    eng.stats.strict_rows = rows or 0
    return eng


class Detokenized:
    """One request's token events as GenerationResponses: mlx-lm's streaming detokenizer (a copy per
    request), EOS kept out of the text."""

    def __init__(self, tokenizer, stats: GenerationStats):
        self.detok, self.stats = tokenizer.detokenizer, stats
        self.detok.reset()

    def response(self, ev: TokenEvent) -> GenerationResponse:
        if ev.finish_reason == "stop":  # EOS is not text
            self.detok.finalize()
        else:
            self.detok.add_token(ev.token)
            if ev.finish_reason:
                self.detok.finalize()
        return GenerationResponse(self.detok.last_segment, ev.token, ev.from_draft, self.stats, ev.finish_reason,
                                  ev.logprob, ev.top_logprobs)


def stream_generate(model, tokenizer, prompt: Union[Prompt, Request], *, proposer: Optional[Proposer] = None,
                    drafter=None, draft_model=None, ngram: Optional[int] = None, tuner: Optional[AutoTuner] = None,
                    prompt_cache: Optional[list] = None, should_stop: Optional[Callable[[], bool]] = None,
                    on_prefill: Optional[Callable[[int, int], None]] = None,
                    **settings) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token.

    `prompt`: text, token ids, or a `Request` (request.py) holding the prompt and every setting. With text
    or ids, the settings come as keywords: `max_tokens` (256), `sampling` (a SamplingParams) or mlx-lm's
    `temp`, `top_p`, `top_k`, `min_p`, `acceptance`; `seed`; `num_draft_tokens` (an int, default 3; "auto":
    chosen each round from this machine's measured costs, pass a kept `tuner` to carry what it learns
    across calls; or any DraftPolicy); `draft` (False: plain decoding with a proposer loaded);
    `logits_processors`; `logprobs`; `stop`; `strict`; `kv_bits`, `kv_group_size`, `quantized_kv_start`.

    Speculation: pass `drafter` (from `load_drafter`), `draft_model` (a smaller model sharing the
    tokenizer), `ngram=N` (prompt lookup) or any `proposer`. Without any, decoding is plain. Greedy output
    is identical either way; with temp > 0 the output distribution is the base's, and in the default
    "coupled" acceptance mode a seed gives exactly plain sampling's tokens.

    `should_stop()` is asked during a long prefill (between its chunks): True ends the request there,
    with no tokens. Between tokens, stop by closing the generator. `on_prefill(done, total)` is called after
    each prefill chunk. `prompt_cache` (a list of the base's caches holding a prefix of the prompt) is
    continued and left holding the history.

    `strict=True` makes speculative output byte-identical to plain decoding (also with strict) on a device
    whose kernels change with the row count: every decode pass runs at STRICT_ROWS rows. Where this
    device computes rows alike (the op check says so; MLX's CPU backend does), it changes nothing and costs
    nothing. `r.stats.strict_rows` says which (0: no padding).

    `logprobs=N` (N >= 1) fills each response's `logprob` and `top_logprobs` (N alternatives) from the base
    model's distribution, the same with drafting on or off; computed only when asked. `stop` strings end
    the text before the first of them (finish_reason "stop").

    `tree_nodes=N` (1..16) drafts a tree of N nodes each round, no deeper than an int `num_draft_tokens`,
    verified in the round's one base pass (docs/TREES.md); "auto" (with num_draft_tokens "auto") chooses a
    chain or a tree each round from this machine's measured costs. 0: chains. Same exactness.
    """
    policy = settings.pop("num_draft_tokens") if _is_policy(settings.get("num_draft_tokens")) else None
    request = make_request(tokenizer, prompt, **settings)
    ranks = as_base(model).ranks
    if ranks is not None:  # sharded: every rank decodes rank 0's request
        request, policy = agree(ranks, request, policy)
    eng = make_engine(model, request, eos_ids=tokenizer.eos_token_ids, proposer=proposer, drafter=drafter,
                      draft_model=draft_model, ngram=ngram, policy=policy, tuner=tuner, prompt_cache=prompt_cache,
                      should_stop=should_stop, on_prefill=on_prefill)
    yield from respond(eng, model, tokenizer)


def respond(engine: Engine, model, tokenizer) -> Iterator[GenerationResponse]:
    """Run an Engine (from make_engine) and yield its tokens as GenerationResponses, cut at its request's
    stop strings, with the weights kept resident meanwhile."""
    text, events = Detokenized(tokenizer, engine.stats), engine.run()
    ranks = as_base(model).ranks
    if ranks is not None and ranks.check:  # every token followed by a check that every rank emitted the same
        events = checked(ranks, events, engine.request.prompt)
    with resident(model, engine.proposer.weights if engine.proposer is not None else None):
        try:
            yield from _stopped_at_strings((text.response(ev) for ev in events), engine.request.stop)
        finally:
            events.close()  # a stop string, or the caller closing us: the engine trims its caches now


def agree(ranks, request: Request, policy: Optional[DraftPolicy]):
    """(request, policy) as rank 0 has them, on every rank: its prompt ids, its seed (a fresh one drawn once),
    and a draft length every rank follows (distributed/requests.py). Draft trees are refused across ranks."""
    if request.tree_nodes:
        raise MlxSpecError("tree_nodes is not supported on a model split over ranks (a tree's verify pass over "
                           "split layers is not checked yet): leave it 0, drafts stay chains")
    ids, seed, sampling, k = agree_request(ranks, request.prompt, request.seed, request.sampling,
                                           policy if policy is not None else request.num_draft_tokens)
    if not isinstance(k, (int, str)):  # a caller's policy, or rank 0's choices of it
        policy, k = k, request.num_draft_tokens
    return request.replace(prompt=tuple(ids), seed=seed, sampling=sampling, num_draft_tokens=k), policy


def _is_policy(value) -> bool:
    return value is not None and not isinstance(value, (int, str))


def _stopped_at_strings(responses: Iterator[GenerationResponse], stops) -> Iterator[GenerationResponse]:
    """Responses until the text reaches a stop string: text before it is yielded, the response where it
    completes carries finish_reason "stop" (its text cut there) and the rest is not generated."""
    if not stops:
        yield from responses
        return
    matcher = StopMatcher(list(stops))
    for r in responses:
        out, hit = matcher.feed(r.text)
        if hit:
            r.text, r.finish_reason = out, "stop"
            yield r
            return
        r.text = out
        if r.finish_reason:
            r.text += matcher.flush()
        yield r


def strict_rows(model, policy: Optional[DraftPolicy]) -> Optional[int]:
    """The row count strict mode pads to on this device, or None where rows already compute alike."""
    from .parity.verdict import row_invariant

    if as_base(model).ranks is not None:
        raise MlxSpecError("strict mode is not available on a model split over ranks (its op check runs the layers "
                           "one by one); MLX's CPU backend computes rows alike anyway (mlx_spec.doctor)")
    if isinstance(policy, FixedK) and policy.k >= STRICT_ROWS:
        raise MlxSpecError(f"strict mode verifies at most {STRICT_ROWS - 1} drafts per round; lower "
                           "--num-draft-tokens (or use auto)")
    return None if row_invariant(model, STRICT_ROWS) else STRICT_ROWS


def generate(model, tokenizer, prompt: Prompt, **kwargs) -> str:
    """The whole completion as a string (keyword arguments as in `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
