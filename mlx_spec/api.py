"""Public Python API: load, load_drafter, generate, stream_generate (mirrors mlx-lm's names and shapes).

Thin: it turns text into token ids, resolves the caller's proposer, sampling and draft-length choices once,
runs an `Engine`, and turns token ids back into text with mlx-lm's streaming detokenizer. The library
default is stateless and silent: a fixed k, and a fresh seed per call unless one is given.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

from .cache import DEFAULT_KV_GROUP_SIZE, KVQuant
from .engine import DEFAULT_NUM_DRAFT_TOKENS, Engine
from .errors import MlxSpecError, PairingError
from .checkpoint import read_config
from .loading import is_hub_id, load_model, load_tokenizer, resolve_model_path
from .families import checkpoint_type, drafter_types, for_type
from .memory import resident
from .paths import cache_root
from .proposers import make_proposer
from .proposers.base import Proposer
from .sampling import DEFAULT_ACCEPTANCE, SamplingParams
from .stats import GenerationStats
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
    z-lab DFlash or a DeepSeek DSpark block drafter (gemma4_dflash, gemma4_dspark); `drafter.describe()`
    says which.
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
    family.check_pairing(drafter, base)
    return drafter


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids for a prompt given as text or ids; adds BOS unless the text already starts with it."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def stream_generate(model, tokenizer, prompt: Prompt, *, proposer: Optional[Proposer] = None, drafter=None,
                    draft_model=None, ngram: Optional[int] = None, max_tokens: int = 256,
                    sampling: Optional[SamplingParams] = None, temp: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, min_p: float = 0.0, acceptance: str = DEFAULT_ACCEPTANCE,
                    seed: Optional[int] = None,
                    num_draft_tokens: Union[int, str, DraftPolicy] = DEFAULT_NUM_DRAFT_TOKENS,
                    tuner: Optional[AutoTuner] = None, logits_processors: Sequence = (),
                    prompt_cache: Optional[list] = None, should_stop: Optional[Callable[[], bool]] = None,
                    strict: bool = False, logprobs: int = 0, kv_bits: Optional[int] = None,
                    kv_group_size: int = DEFAULT_KV_GROUP_SIZE, quantized_kv_start: int = 0,
                    on_prefill: Optional[Callable[[int, int], None]] = None,
                    tree_nodes: Union[int, str, None] = None) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token.

    Speculation: pass `drafter` (from `load_drafter`), `draft_model` (a smaller model sharing the
    tokenizer), `ngram=N` (prompt lookup) or any `proposer`. Without any, decoding is plain. Greedy output
    is identical either way; with temp > 0 the output distribution is the base's, and in the default
    "coupled" acceptance mode a seed gives exactly plain sampling's tokens.

    `num_draft_tokens`: an int (fixed k, default 3), "auto" (chosen each round from this machine's measured
    costs; pass a kept `tuner` to carry what it learns across calls) or any DraftPolicy. `sampling` (a
    SamplingParams) replaces temp/top_p/top_k/min_p/acceptance. `should_stop()` is asked during a long
    prefill (between its 2048-token chunks): True ends the request there, with no tokens. Between tokens,
    stop by closing the generator.

    `strict=True` makes speculative output byte-identical to plain decoding (also with strict) on a device
    whose kernels change with the row count: every decode pass runs at STRICT_ROWS rows. Where this
    device computes rows alike (the op check says so; MLX's CPU backend does), it changes nothing and costs
    nothing. `r.stats.strict_rows` says which (0: no padding).

    `logprobs=N` (N >= 1) fills each response's `logprob` and `top_logprobs` (N alternatives) from the base
    model's distribution, the same with drafting on or off; computed only when asked.
    
    `kv_bits` (4 or 8), `kv_group_size`, `quantized_kv_start`: quantized K/V as mlx-lm spells them (the
    cache holds full precision until it holds `quantized_kv_start` positions); rollback stays exact.
    Speculative greedy equals plain greedy with the same settings. A given `prompt_cache` brings its own.
    `on_prefill(done, total)` is called after each prefill chunk.

    `tree_nodes=N` (1..16) drafts a tree of N nodes each round, no deeper than an int `num_draft_tokens`,
    verified in the round's one base pass (docs/TREES.md); "auto" (with num_draft_tokens "auto") chooses a
    chain or a tree each round from this machine's measured costs. 0 or None: chains. Same exactness.
    """
    ids = encode_prompt(tokenizer, prompt)
    sampling = (sampling or SamplingParams(temp, top_p, top_k, min_p, acceptance)).validate()
    proposer = make_proposer(model, proposer=proposer, drafter=drafter, draft_model=draft_model, ngram=ngram)
    kv = KVQuant.from_flags(kv_bits, kv_group_size, quantized_kv_start)
    if tree_nodes and (strict or logits_processors):
        raise MlxSpecError("tree_nodes: trees are verified without strict mode's padding and without logits "
                           "processors (they see one history per row); use chains with them")
    policy = draft_policy(num_draft_tokens, model, proposer, tuner, kv, tree_nodes) if proposer is not None else None
    if policy is None:
        proposer = None  # k = 0: plain decoding (a draft model is not even prefilled)
    rows = strict_rows(model, policy) if strict else None
    eng = Engine(model, ids, proposer=proposer, policy=policy, sampling=sampling, seed=seed,
                 max_tokens=max_tokens, eos_ids=tokenizer.eos_token_ids, logits_processors=logits_processors,
                 cache=prompt_cache, should_stop=should_stop, strict_rows=rows, logprobs=logprobs, kv=kv,
                 on_prefill=on_prefill)
    eng.stats.strict = strict
    eng.stats.strict_rows = rows or 0
    detok = tokenizer.detokenizer
    detok.reset()
    with resident(model, proposer.weights if proposer is not None else None):
        for ev in eng.run():
            if ev.finish_reason == "stop":  # EOS is not text
                detok.finalize()
            else:
                detok.add_token(ev.token)
                if ev.finish_reason:
                    detok.finalize()
            yield GenerationResponse(detok.last_segment, ev.token, ev.from_draft, eng.stats, ev.finish_reason,
                                     ev.logprob, ev.top_logprobs)


def strict_rows(model, policy: Optional[DraftPolicy]) -> Optional[int]:
    """The row count strict mode pads to on this device, or None where rows already compute alike."""
    from .parity.verdict import row_invariant

    if isinstance(policy, FixedK) and policy.k >= STRICT_ROWS:
        raise MlxSpecError(f"strict mode verifies at most {STRICT_ROWS - 1} drafts per round; lower "
                           "--num-draft-tokens (or use auto)")
    return None if row_invariant(model, STRICT_ROWS) else STRICT_ROWS


def generate(model, tokenizer, prompt: Prompt, **kwargs) -> str:
    """The whole completion as a string (keyword arguments as in `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
