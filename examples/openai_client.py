"""Talk to `mlx_spec.server` with the official OpenAI Python client (pip install openai).

Start a server first, e.g.

    mlx_spec.server --model mlx-community/gemma-4-e2b-it-4bit --drafter auto

then run `python examples/openai_client.py [--base-url http://127.0.0.1:8080/v1]`. It asks the same question
with drafting on and off (same greedy text, different speed), streams a reply, and runs a plain completion.
Our extra request fields go in `extra_body`; the extra `speculative` response field is in `model_extra`.
"""

import argparse
import time

from openai import OpenAI


def show_speculative(response) -> str:
    spec = (response.model_extra or {}).get("speculative") or {}
    if not spec.get("rounds"):
        return "drafting off"
    by_position = ", ".join(f"{a:.2f}" for a in spec["acceptance_by_position"])
    return (f"{spec['proposer']}: τ {spec['tau']:.2f}, accepted {spec['accepted']}/{spec['drafted']} "
            f"({spec['acceptance_rate']:.0%}), by position [{by_position}]")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="not-needed")  # the server does not check keys
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}]

    # 1. the same greedy request with drafting on and off: identical text, different speed
    texts = []
    for draft in (True, False):
        start = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                           temperature=0.0, extra_body={"draft": draft, "num_draft_tokens": 4})
        elapsed = time.perf_counter() - start
        texts.append(r.choices[0].message.content)
        print(f"draft={draft}: {r.usage.completion_tokens} tokens in {elapsed:.2f} s "
              f"({r.usage.completion_tokens / elapsed:.1f} tok/s); {show_speculative(r)}")
    print("identical text:", texts[0] == texts[1])
    print(texts[0])

    # 2. streaming: deltas as they come; the last chunk carries finish_reason, usage and speculative stats
    print("\n--- streaming ---")
    stream = client.chat.completions.create(model=model, messages=messages + [
        {"role": "assistant", "content": texts[0]}, {"role": "user", "content": "Now add a docstring."}],
        max_tokens=args.max_tokens, temperature=0.0, stream=True)
    last = None
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
            last = chunk
    print(f"\n[{last.choices[0].finish_reason}; {last.usage.completion_tokens} tokens; {show_speculative(last)}]")

    # 3. a raw-text completion, cut at a stop string
    print("\n--- completion ---")
    r = client.completions.create(model=model, prompt="def fibonacci(n):\n", max_tokens=args.max_tokens,
                                  temperature=0.0, stop=["\n\n\n"])
    print(r.choices[0].text)
    print(f"[{r.choices[0].finish_reason}; {show_speculative(r)}]")


if __name__ == "__main__":
    main()
