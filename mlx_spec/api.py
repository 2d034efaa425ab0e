"""Public Python API: load, load_drafter, generate, stream_generate (mirrors mlx-lm's names and shapes).

Thin: it turns text into token ids, builds the proposer the caller asked for, runs an `Engine`, and turns
token ids back into text with mlx-lm's streaming detokenizer.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

from . import engine as engine_mod
from .engine import Engine, GenerationStats, SamplingParams
from .loading import load_model, load_tokenizer
from .memory import resident

Prompt = Union[str, List[int]]


@dataclass
class GenerationResponse:
    """One streamed step. `text` is the new text segment (may be empty mid-character); `from_draft` says
    whether the token was a draft the base accepted (False for the base's own bonus token)."""

    text: str
    token: int
    from_draft: bool
    stats: GenerationStats
    finish_reason: Optional[str] = None

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


def load(path_or_repo: str, dtype: Optional[str] = None, q_bits: Optional[int] = None):
    """Load (model, tokenizer) from a local directory or a hub repo id.

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
    model, config, model_dir = load_model(path_or_repo, dtype=dtype, q_bits=q_bits)
    return model, load_tokenizer(model_dir, config)


def encode_prompt(tokenizer, prompt: Prompt) -> List[int]:
    """Token ids for a prompt given as text or ids; adds BOS unless the text already starts with it."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def stream_generate(model, tokenizer, prompt: Prompt, *, drafter=None, draft_model=None,
                    ngram: Optional[int] = None, max_tokens: int = 256, temp: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: Optional[int] = None,
                    num_draft_tokens: Union[int, str] = engine_mod.DEFAULT_NUM_DRAFT_TOKENS,
                    acceptance: str = "rejection", logits_processors: Sequence = (),
                    prompt_cache: Optional[list] = None,
                    should_stop: Optional[Callable[[], bool]] = None) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token.

    `should_stop()` is asked during a long prefill (between its 2048-token chunks): True ends the request
    there, with no tokens. Between tokens, stop by closing the generator.

    Speculation: pass `drafter` (an MTP drafter from `load_drafter`, or any Proposer), `draft_model` (a
    smaller model sharing the tokenizer) or `ngram=N` (prompt lookup). Without any, decoding is plain.
    Greedy output is identical either way; with temp > 0 the output distribution is the base's.
    """
    from .proposers import make_proposer

    ids = encode_prompt(tokenizer, prompt)
    proposer = make_proposer(model, drafter=drafter, draft_model=draft_model, ngram=ngram)
    sampling = SamplingParams(temp, top_p, top_k, min_p, acceptance)
    k, policy = engine_mod.resolve_num_draft_tokens(num_draft_tokens, model, proposer)
    eng = Engine(model, ids, proposer=proposer, sampling=sampling, max_tokens=max_tokens,
                 num_draft_tokens=k, eos_ids=tokenizer.eos_token_ids, logits_processors=logits_processors,
                 seed=seed, cache=prompt_cache, draft_policy=policy, should_stop=should_stop)
    detok = tokenizer.detokenizer
    detok.reset()
    # a Proposer passed as drafter (a chat's or server's kept draft-model proposer) counts with its model
    drafter_weights = drafter
    if hasattr(drafter, "propose"):
        drafter_weights = getattr(drafter, "model", None) or getattr(drafter, "drafter", None)
    with resident(model, drafter_weights, draft_model):
        for ev in eng.run():
            if ev.finish_reason == "stop":  # EOS is not text
                detok.finalize()
            else:
                detok.add_token(ev.token)
                if ev.finish_reason:
                    detok.finalize()
            yield GenerationResponse(detok.last_segment, ev.token, ev.from_draft, eng.stats, ev.finish_reason)


def generate(model, tokenizer, prompt: Prompt, **kwargs) -> str:
    """The whole completion as a string (keyword arguments as in `stream_generate`)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
