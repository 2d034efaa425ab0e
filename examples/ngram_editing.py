"""N-gram (prompt lookup) speculation on a document-editing prompt: no drafter weights at all.

    python examples/ngram_editing.py [--model DIR] [--max-tokens N]

Editing is where prompt lookup shines: most of the answer is already in the prompt, so the last few
tokens generated almost always occur earlier and what followed them is a good guess. The default model is
the tiny code model in tests/fixtures, asked to continue a file that repeats its own structure; for a chat
model, pass --model and it is asked to rewrite a note with one change. Both runs must print the same text.
"""

import argparse
import sys
import time
from pathlib import Path

from mlx_spec import generate, load, stream_generate

TINY = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gemma4-tiny-code" / "base"
CODE = '''class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return "Point(x=%r, y=%r)" % (self.x, self.y)


class Size:
    def __init__(self, width, height):
'''
NOTE = ("Rewrite this note exactly, changing only Tuesday to Friday:\n\n"
        "The design review moves to Tuesday at 3 pm. Bring the mockups, the open questions and the budget "
        "sheet. Remote people can join the usual call; the recording goes to the shared drive afterwards.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--max-tokens", type=int, default=100)
    args = p.parse_args()
    model, tokenizer = load(args.model)
    prompt = CODE
    if args.model != str(TINY) and tokenizer.has_chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": NOTE}], add_generation_prompt=True,
                                               tokenize=False)
    start = time.perf_counter()
    plain = generate(model, tokenizer, prompt, max_tokens=args.max_tokens)
    plain_time = time.perf_counter() - start
    start, pieces = time.perf_counter(), []
    for r in stream_generate(model, tokenizer, prompt, ngram=3, num_draft_tokens=4, max_tokens=args.max_tokens):
        pieces.append(r.text)
        stats = r.stats
    spec_time = time.perf_counter() - start
    print(plain)
    assert "".join(pieces) == plain, "n-gram speculation must print exactly the plain text"
    print(f"\nplain {plain_time:.2f} s; n-gram {spec_time:.2f} s; tau {stats.tau:.2f}, "
          f"acceptance {stats.acceptance_rate:.0%} over {stats.rounds} rounds", file=sys.stderr)


if __name__ == "__main__":
    main()
