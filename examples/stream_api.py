"""Stream tokens with the Python API, with a Gemma 4 MTP drafter, and show what speculation did.

    python examples/stream_api.py [--model DIR] [--drafter DIR] [--prompt TEXT]

Defaults to the trained tiny pair shipped in tests/fixtures (a code model), so it runs anywhere; point
--model/--drafter at a converted Gemma 4 and its assistant for the real thing. Drafted tokens the base
accepted are printed in green on a terminal.
"""

import argparse
import sys
from pathlib import Path

from mlx_spec import load, load_drafter, stream_generate

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gemma4-tiny-code"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY / "base"))
    p.add_argument("--drafter", default=str(TINY / "assistant"))
    p.add_argument("--prompt", default="import os\n\n\ndef list_python_files(root):\n")
    p.add_argument("--max-tokens", type=int, default=120)
    args = p.parse_args()

    model, tokenizer = load(args.model)
    drafter = load_drafter(args.drafter, model)
    color = sys.stdout.isatty()
    last = None
    for r in stream_generate(model, tokenizer, args.prompt, drafter=drafter, max_tokens=args.max_tokens,
                             num_draft_tokens=3):
        text = f"\033[32m{r.text}\033[0m" if (color and r.from_draft) else r.text
        print(text, end="", flush=True)
        last = r
    s = last.stats
    print(f"\n\n{s.generation_tokens} tokens at {s.generation_tps:.1f} tok/s; {s.rounds} rounds, "
          f"tau {s.tau:.2f}, acceptance {s.acceptance_rate:.0%} "
          f"(by position {', '.join(f'{a:.2f}' for a in s.acceptance_by_position)})", file=sys.stderr)


if __name__ == "__main__":
    main()
