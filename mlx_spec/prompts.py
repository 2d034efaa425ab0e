"""The benchmark's built-in prompts: four kinds of work, because drafts are accepted at very different
rates on each (code and structured output repeat themselves; open chat does not).

A prompt file (`mlx_spec.bench --prompts FILE`) is either JSON (a list of strings or of objects with
"prompt" and optional "kind"), JSON Lines of the same, or plain text with one prompt per line (`\\n`
for a newline inside a prompt).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List

from .errors import MlxSpecError

KINDS = ("chat", "code", "summarize", "structured")


@dataclass(frozen=True)
class Prompt:
    kind: str
    text: str


_ARTICLE = (
    "The city council met on Tuesday to discuss the future of the old rail yard on the east side of town. "
    "The site, unused since the freight line closed in 1998, covers about forty acres. Three proposals were "
    "presented. The first, from a housing developer, would build 1,200 apartments, a fifth of them priced "
    "for low-income families. The second, backed by a coalition of neighbourhood groups, would turn most of "
    "the land into a park with playing fields and a community garden, paid for by a bond measure. The third "
    "would lease the yard to a logistics company for a warehouse that promises 300 jobs. Residents who spoke "
    "were split: several worried about truck traffic near the elementary school, others said the city "
    "badly needs both housing and jobs. Engineers reported that parts of the soil are contaminated with "
    "diesel and heavy metals, and that any plan will need a cleanup costing between 8 and 14 million "
    "dollars. The council postponed a vote until March and asked staff to estimate the tax revenue and "
    "traffic of each option."
)

BUILTIN: List[Prompt] = [
    Prompt("chat", "What are three practical ways to stay focused when working from home? Answer briefly."),
    Prompt("chat", "Explain to a new programmer the difference between a process and a thread."),
    Prompt("code", "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals "
                   "given as (start, end) tuples, with a docstring and type hints."),
    Prompt("code", "Complete this Python module:\n\n```python\nimport os\nimport sys\n\n\n"
                   "def list_files(root, suffix):\n    \"\"\"Return the paths under root that end with suffix.\"\"\"\n"),
    Prompt("summarize", f"{_ARTICLE}\n\nSummarize the article above in three sentences."),
    Prompt("summarize", f"{_ARTICLE}\n\nList the three proposals from the article above, one line each, "
                        "with their main argument."),
    Prompt("structured", "Return a JSON array of objects with the fields name, capital and population "
                         "(millions) for France, Japan, Brazil, Kenya and Canada. Output only JSON."),
    Prompt("structured", "Convert this CSV to a JSON list of objects, one per row:\n\n"
                         "id,product,price,in_stock\n1,keyboard,49.90,true\n2,mouse,19.50,true\n"
                         "3,monitor,189.00,false\n4,headset,59.00,true\n5,webcam,74.25,false"),
]


def builtin(kind: str = "all") -> List[Prompt]:
    if kind == "all":
        return list(BUILTIN)
    if kind not in KINDS:
        raise MlxSpecError(f"unknown prompt kind {kind!r}: use all, {', '.join(KINDS)} or a file")
    return [p for p in BUILTIN if p.kind == kind]


def _from_item(item, where: str) -> Prompt:
    if isinstance(item, str):
        return Prompt("file", item)
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return Prompt(str(item.get("kind", "file")), item["prompt"])
    raise MlxSpecError(f"{where}: expected a string or an object with a \"prompt\" string")


def load_prompts(path: str) -> List[Prompt]:
    """Prompts from a file (formats in the module docstring)."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MlxSpecError(f"cannot read the prompt file {p}: {e}") from None
    prompts: List[Prompt] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise MlxSpecError(f"{p} looks like JSON but does not parse: {e}") from None
        prompts = [_from_item(x, f"{p} item {i}") for i, x in enumerate(items)]
    elif stripped.startswith("{") or p.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(_from_item(json.loads(line), f"{p} line {i}"))
                except ValueError as e:
                    raise MlxSpecError(f"{p} line {i} is not JSON: {e}") from None
    else:
        prompts = [Prompt("file", line.replace("\\n", "\n")) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MlxSpecError(f"{p} holds no prompts")
    return prompts


def resolve(spec: str) -> List[Prompt]:
    """--prompts value: all, a kind, or a file."""
    if spec == "all" or spec in KINDS:
        return builtin(spec)
    if Path(spec).exists():
        return load_prompts(spec)
    raise MlxSpecError(f"--prompts {spec!r} is neither all, a kind ({', '.join(KINDS)}) nor an existing file")
