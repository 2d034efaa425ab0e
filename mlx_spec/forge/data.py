"""Training data for forge: files in the formats mlx-lm users have, turned into token windows.

Formats (`--data PATH`):
- a `.jsonl` file, one JSON object a line, all of one kind: `{"text": ...}`, `{"messages": [...]}` (chat
  template applied) or `{"prompt": ..., "completion": ...}` (as a user turn and the model's reply);
- a directory in mlx-lm's layout (`train.jsonl`, optional `valid.jsonl`);
- any other file, or a directory of files (read recursively, sorted; hidden and non-UTF-8 files
  skipped): plain text, one document per file.
Tokenizing is mlx-lm's (`mlx_lm.tuner.datasets.create_dataset`), so a dataset means here what it means
to `mlx_lm.lora`. Every line is checked first, so a bad one is reported by its number.

A document longer than `max_len` tokens is cut into windows, each after the first starting with BOS again
(at inference every prompt starts with it). Every window knows its prompt: the chat part before the
model's reply (the chat template with its generation prompt), or the first `prompt_tokens` tokens of
text; self-generation continues these prompts and
the final evaluation decodes from them. Held-out windows come from the end of the data (the last
documents), or from `--valid-data` / `valid.jsonl`.

Knows nothing of models except the tokenizer (and the base, in `self_generate`).
"""

import json
import random
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import MlxSpecError

KINDS = (("prompt", "completion"), ("messages",), ("text",))  # mlx-lm's precedence (create_dataset)
MIN_WINDOW = 8  # shorter tails teach little and cost a batch row
DEFAULT_HOLDOUT = 0.05
MAX_HOLDOUT_WINDOWS = 64


class DataError(MlxSpecError):
    """A data file is missing, empty or malformed (the message names the file and line)."""


@dataclass
class Window:
    """One training sequence (starting with BOS) and the prompt a user would send for it: the chat
    template up to the model's turn (which may tokenize differently from the same span of `tokens`), or
    the first `prompt_len` tokens."""

    tokens: List[int]
    prompt_len: int
    prompt: Optional[List[int]] = None
    first: bool = True  # the start of its document (the report decodes from these first)

    @property
    def prompt_tokens(self) -> List[int]:
        return list(self.prompt) if self.prompt is not None else self.tokens[: self.prompt_len]


@dataclass
class Dataset:
    train: List[Window]
    valid: List[Window]
    kind: str  # "text", "messages", "prompt/completion"


def _kind_of(record: dict) -> Optional[Tuple[str, ...]]:
    for keys in KINDS:
        if all(k in record for k in keys):
            return keys
    return None


def read_jsonl(path: Path) -> Tuple[str, List[Tuple[str, dict]]]:
    """(kind, [(where, record)]): every non-blank line must be a JSON object of the file's first kind."""
    records, kind = [], None
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise DataError(f"{where}: JSON nested too deeply to read") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                keys = _kind_of(record)
                if keys is None:
                    raise DataError(f"{where}: no 'text', 'messages' or 'prompt'+'completion' field "
                                    f"(found {sorted(record)[:6]})")
                kind = kind or keys
                if keys != kind:
                    raise DataError(f"{where}: a {'/'.join(keys)} record in a file of {'/'.join(kind)} records; "
                                    "use one format per file")
                for k in keys:
                    if k == "messages":
                        if not isinstance(record[k], list) or not record[k] or not all(
                                isinstance(m, dict) and "role" in m and "content" in m for m in record[k]):
                            raise DataError(f"{where}: 'messages' must be a non-empty list of "
                                            "{{\"role\": ..., \"content\": ...}} objects")
                    elif not isinstance(record[k], str):
                        raise DataError(f"{where}: '{k}' must be a string, got {type(record[k]).__name__}")
                records.append((where, record))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not records:
        raise DataError(f"{path} holds no examples")
    return "/".join(kind), records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); pass text files, or .jsonl") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def read_records(path) -> Tuple[str, List[Tuple[str, dict]], Optional[Path]]:
    """(kind, [(where, record)], the mlx-lm layout's valid.jsonl if any) for a file or directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        if (path / "train.jsonl").is_file():
            valid = path / "valid.jsonl"
            return (*read_jsonl(path / "train.jsonl"), valid if valid.is_file() else None)
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"data directory {path} holds no files")
        records = []
        for p in files:  # a directory may hold binaries (caches, images): those are skipped
            try:
                records.append((str(p), {"text": p.read_text(encoding="utf-8")}))
            except UnicodeDecodeError:
                continue
            except OSError as e:
                raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        if not records:
            raise DataError(f"data directory {path} holds no UTF-8 text files")
    elif path.suffix == ".jsonl":
        return (*read_jsonl(path), None)
    else:
        records = [(str(path), {"text": _read_text(path)})]
    records = [(w, r) for w, r in records if r["text"].strip()]
    if not records:
        raise DataError(f"{path} holds no text")
    return "text", records, None


def _prompt_messages(kind: str, record: dict):
    """(messages a user sends, add_generation_prompt) for a chat record: all but the model's last reply."""
    if kind == "prompt/completion":
        return [{"role": "user", "content": record["prompt"]}], True
    messages = record["messages"]
    last_is_reply = messages[-1].get("role") == "assistant"
    return (messages[:-1] if last_is_reply and len(messages) > 1 else messages), True


def tokenize(kind: str, records: Sequence[Tuple[str, dict]], tokenizer) -> List[Tuple[List[int], Optional[List[int]]]]:
    """[(tokens, prompt tokens or None for text)] through mlx-lm's dataset classes (the chat template for
    messages and prompt/completion, as mlx_lm.lora applies it)."""
    from mlx_lm.tuner.datasets import create_dataset

    data = [r for _, r in records]
    dataset = create_dataset(data, tokenizer, types.SimpleNamespace(mask_prompt=False))
    with _quiet_transformers():  # "sequence longer than model_max_length": forge cuts windows itself
        return [_tokenize_one(kind, where, record, dataset, tokenizer) for (where, _), record in zip(records, data)]


@contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def _tokenize_one(kind: str, where: str, record: dict, dataset, tokenizer):
    """(tokens, prompt tokens or None) of one record; a record that cannot be tokenized names its line."""
    try:
        tokens, _ = dataset.process(record)
        prompt = None
        if kind != "text":
            messages, generation = _prompt_messages(kind, record)
            prompt = list(tokenizer.apply_chat_template(messages, tools=record.get("tools"),
                                                        add_generation_prompt=generation, return_dict=False))
    except Exception as e:  # transformers raises many types (no chat template, bad roles, ...)
        reason = " ".join(str(e).split())
        raise DataError(f"{where}: cannot tokenize this {kind} record: {reason}") from e
    return list(tokens), prompt


def windows(docs: Sequence[Tuple[List[int], Optional[List[int]]]], max_len: int, bos: Optional[int],
            prompt_tokens: int) -> List[Window]:
    """Cut documents into windows of at most max_len tokens, each starting with BOS. A document's own
    prompt (chat) goes with its first window; other windows' prompts are their first tokens."""
    out = []
    for tokens, prompt in docs:
        if bos is not None and (not tokens or tokens[0] != bos):
            tokens = [bos] + tokens
        first = True
        start = 0
        while start < len(tokens):
            if first:
                piece = tokens[:max_len]
                start = len(piece)
            else:
                head = [bos] if bos is not None else []
                piece = head + tokens[start:start + max_len - len(head)]
                start += max_len - len(head)
            if len(piece) >= MIN_WINDOW:
                own = prompt if first and prompt and len(prompt) < max_len else None
                plen = len(own) if own else max(1, min(prompt_tokens, len(piece) // 2))
                out.append(Window(piece, min(plen, len(piece)), own, first))
            first = False
    return out


def load_dataset(path, tokenizer, max_len: int, prompt_tokens: int, valid_path=None,
                 holdout: float = DEFAULT_HOLDOUT) -> Dataset:
    kind, records, layout_valid = read_records(path)
    bos = getattr(tokenizer, "bos_token_id", None)
    train = windows(tokenize(kind, records, tokenizer), max_len, bos, prompt_tokens)
    valid_path = valid_path or layout_valid
    if valid_path is not None:
        vkind, vrecords, _ = read_records(valid_path)
        valid = windows(tokenize(vkind, vrecords, tokenizer), max_len, bos, prompt_tokens)
    else:
        n = min(MAX_HOLDOUT_WINDOWS, max(1, int(round(holdout * len(train)))))
        if len(train) < 2:
            raise DataError(f"{path} gives {len(train)} training window(s) of >= {MIN_WINDOW} tokens; "
                            "forge needs more data (or pass --valid-data for the held-out part)")
        train, valid = train[:-n], train[-n:]
    if not train:
        raise DataError(f"{path} gives no training windows of >= {MIN_WINDOW} tokens")
    if not valid:
        raise DataError(f"{valid_path} gives no held-out windows of >= {MIN_WINDOW} tokens")
    return Dataset(train, valid, kind)


def greedy_continuations(base, prompts: Sequence[List[int]], n_tokens: int, eos_ids, batch_size: int = 32,
                         max_len: Optional[int] = None) -> List[List[int]]:
    """The base's greedy continuation (n_tokens, cut after an EOS) of each prompt; prompts of one length
    decode together as a batch. With max_len, prompt + continuation stay within max_len tokens (what a
    window keeps; forge bounds it by the base's context)."""
    out: List[Optional[List[int]]] = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    eos = set(eos_ids or ())
    for length, idx in by_len.items():
        n = n_tokens if max_len is None else min(n_tokens, max_len - length)
        if n < 1:
            for i in idx:
                out[i] = []
            continue
        for s in range(0, len(idx), batch_size):
            rows = idx[s:s + batch_size]
            cache = base.make_cache()
            logits, _ = base.forward(mx.array([prompts[i] for i in rows]), cache)  # (B, T, V)
            y = mx.argmax(logits[:, -1], axis=-1)
            steps = [y]
            for _ in range(n - 1):
                logits, _ = base.forward(y[:, None], cache)
                y = mx.argmax(logits[:, -1], axis=-1)
                steps.append(y)
                mx.async_eval(y)
            gen = np.array(mx.stack(steps, axis=1)).tolist()
            for i, g in zip(rows, gen):
                cut = next((j + 1 for j, t in enumerate(g) if t in eos), len(g))
                out[i] = g[:cut]
    return out


def self_generate(base, wins: Sequence[Window], n_tokens: int, eos_ids, max_len: int) -> List[Window]:
    """One window per given window: its prompt, then the base's own greedy continuation (n_tokens at most)."""
    prompts = [w.prompt_tokens for w in wins]
    gens = greedy_continuations(base, prompts, n_tokens, eos_ids, max_len=max_len)  # no token decoded to drop
    return [Window((p + g)[:max_len], len(p), p, w.first) for w, p, g in zip(wins, prompts, gens)]


def held_out(valid: Sequence[Window], n_prompts: int, n_max: int = MAX_HOLDOUT_WINDOWS) -> List[Window]:
    """The held-out windows forge uses: first the report's n_prompts (documents' beginnings first, as a
    user's prompt starts a text), then others taken evenly across the rest, n_max in all (so one long
    document does not fill them)."""
    ordered = [w for w in valid if w.first] + [w for w in valid if not w.first]
    chosen, rest = ordered[:n_prompts], ordered[n_prompts:]
    room = max(0, n_max - len(chosen))
    if len(rest) > room:
        rest = [rest[int(i * len(rest) / room)] for i in range(room)] if room else []
    return chosen + rest


class Batches:
    """Shuffled batches of windows, epoch after epoch; `state()`/`restore()` resume the same order.

    Windows of similar length go together (sorted within a shuffled stretch, as mlx-lm does), and a batch
    is padded to its longest window; `mask` marks the real tokens."""

    def __init__(self, wins: Sequence[Window], batch_size: int, seed: int, pad_id: int = 0):
        self.wins, self.batch_size, self.seed, self.pad_id = list(wins), batch_size, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> List[List[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        idx = list(range(len(self.wins)))
        rng.shuffle(idx)
        stretch = self.batch_size * 16
        batches = []
        for s in range(0, len(idx), stretch):
            part = sorted(idx[s:s + stretch], key=lambda i: len(self.wins[i].tokens))
            batches += [part[b:b + self.batch_size] for b in range(0, len(part), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)

    def __iter__(self) -> Iterator[Tuple[mx.array, mx.array]]:
        return self

    def next_rows(self) -> List[int]:
        """The next batch's window indices (advances)."""
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        rows = self._order[self.index]
        self.index += 1
        return rows

    def upcoming(self, n: int) -> List[int]:
        """Window indices of the batches after this one, about n of them (within this epoch)."""
        out = []
        for rows in self._order[self.index:]:
            if len(out) >= n:
                break
            out += rows
        return out

    def __next__(self) -> Tuple[mx.array, mx.array]:
        return pad([self.wins[i].tokens for i in self.next_rows()], self.pad_id)


class SelfGeneratedBatches(Batches):
    """Batches of the base's own text: each window's prompt and the base's greedy continuation of it,
    generated when the window is first needed, `pool` windows at a time (one batched decode). Nothing is
    generated that training does not reach, and the generating counts toward the training time, so a
    --minutes budget compares fairly with training on the data as it is. Greedy decoding is
    deterministic, so a resumed run regenerates the same windows."""

    def __init__(self, wins: Sequence[Window], batch_size: int, seed: int, pad_id: int,
                 generate: Callable[[List[Window]], List[Window]], pool: int = 32):
        super().__init__(wins, batch_size, seed, pad_id)
        self.generate, self.pool = generate, pool
        self.generated = {}

    def __next__(self) -> Tuple[mx.array, mx.array]:
        rows = self.next_rows()
        missing = [i for i in rows if i not in self.generated]
        if missing:
            ahead = [j for j in self.upcoming(self.pool) if j not in self.generated]
            todo = list(dict.fromkeys(missing + ahead))[: max(self.pool, len(missing))]
            for j, w in zip(todo, self.generate([self.wins[j] for j in todo])):
                self.generated[j] = w
        return pad([self.generated[i].tokens for i in rows], self.pad_id)


def pad(rows: Sequence[List[int]], pad_id: int = 0) -> Tuple[mx.array, mx.array]:
    """(tokens (B, L) int32, mask (B, L) bool) right-padded to the longest row."""
    L = max(len(r) for r in rows)
    tokens = np.full((len(rows), L), pad_id, np.int32)
    mask = np.zeros((len(rows), L), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
        mask[i, :len(r)] = True
    return mx.array(tokens), mx.array(mask)
