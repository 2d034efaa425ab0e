"""`mlx_spec.chat`: a multi-turn terminal chat with speculative decoding.

    mlx_spec.chat --model M [--drafter D | --draft-model M2 | --ngram [N]] [--system-prompt S]
                  [--max-tokens N] [--temp T] [--seed S] [--num-draft-tokens K|auto] [--no-draft] [--max-context N]

Replies stream to stdout; prompts, the one-line summary after each reply and command output go to stderr.
Commands: /reset, /stats, /draft on|off, /temp X, /help, /quit. Ctrl-C stops the current reply.

`ChatSession` owns the conversation. Each turn it renders the whole conversation with the chat template
and runs it as a conversation turn (conversation.py): the kept cache's longest prefix is reused and only the
new tokens are prefilled, so the tokens are always those of a full re-prefill. It knows nothing of
terminals; `ChatUI` does the I/O.
"""

import argparse
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from .api import GenerationResponse, encode_prompt
from .cli import (DEFAULT_MAX_TOKENS, ArgumentParser, add_model_args, add_sampling_args, check_length_args,
                  load_models, make_tuner, print_stats, run, sampling_params, tolerate_stdin, valid_text)
from .cache import KVQuant
from .conversation import Conversations
from .long_context import PrefillProgress, add_kv_args, check_memory, kv_settings, load_session, model_dir_context
from .errors import MlxSpecError
from .models.base import context_length
from .proposers.base import Proposer
from .request import Request
from .sampling import SamplingParams
from .stats import GenerationStats
from .tuning.tuner import AutoTuner

PROMPT = ">>> "
HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /stats          statistics of the last reply and of the conversation
  /draft on|off   speculative decoding on or off
  /temp X         sampling temperature (0 = greedy)
  /help           this list
  /quit           exit (Ctrl-D too); Ctrl-C stops a reply"""


class ContextFullError(MlxSpecError):
    """The conversation (plus the new message) no longer fits the model's context."""


@dataclass
class TurnInfo:
    """What the last reply cost: tokens prefilled vs. reused from the cache, and how it ended."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    stats: Optional[GenerationStats] = None
    finish_reason: Optional[str] = None  # "stop", "length", or None when interrupted
    context_full: bool = False  # the reply was cut because the context ran out


class ChatSession:
    """A conversation with one model, its kept K/V and (optionally) a proposer."""

    def __init__(self, model, tokenizer, *, proposer: Optional[Proposer] = None, system_prompt: Optional[str] = None,
                 max_tokens: int = DEFAULT_MAX_TOKENS, max_context: Optional[int] = None,
                 sampling: SamplingParams = SamplingParams(), seed: Optional[int] = None, num_draft_tokens=3,
                 drafting: Optional[bool] = None, reuse_cache: bool = True, tuner: Optional[AutoTuner] = None,
                 strict: bool = False, kv: Optional[KVQuant] = None, session: Optional[tuple] = None,
                 on_prefill: Optional[Callable[[int, int], None]] = None, tree_nodes=None):
        """`kv`: quantized K/V (--kv-bits ...); `session`: (caches, token ids) of a saved prompt
        (--prompt-cache-file) that every conversation starting with those tokens continues from;
        `on_prefill(done, total)`: progress of a long turn's prefill; `tree_nodes`: --tree-nodes."""
        if not getattr(tokenizer, "has_chat_template", False):
            raise MlxSpecError("this model's tokenizer has no chat template (no chat_template in "
                               "tokenizer_config.json or chat_template.jinja); use mlx_spec.generate for raw prompts")
        self.model, self.tokenizer = model, tokenizer
        self.proposer = proposer
        self.drafting = proposer is not None if drafting is None else drafting and proposer is not None
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.max_context = max_context or context_length(model)
        self.sampling = sampling.validate()
        self.seed = seed
        self.num_draft_tokens, self.tree_nodes = num_draft_tokens, tree_nodes
        self.strict, self.session, self.on_prefill = strict, session, on_prefill
        self.conversations = Conversations(model, tokenizer, proposer, tuner=tuner, reuse_cache=reuse_cache, kv=kv)
        if session is not None:  # kept whole: every conversation that starts with it continues from a copy
            self.conversations.prompt_cache.pin(*session)
        self._slot_tokens: List[int] = []
        self.reset()

    @property
    def proposer_name(self) -> Optional[str]:
        return self.proposer.name if self.proposer is not None else None

    def reset(self) -> None:
        self.messages: List[dict] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.turns = 0
        self.last = TurnInfo()
        self.conversations.prompt_cache.drop()

    @property
    def _slot(self):
        return self.conversations.prompt_cache.latest

    @property
    def cache(self) -> Optional[list]:
        return self._slot.cache if self._slot else None

    @property
    def cached_tokens(self) -> List[int]:
        """The tokens whose K/V the cache holds, in order."""
        return list(self._slot.tokens) if self._slot else []

    def conversation_tokens(self, messages: List[dict]) -> List[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return encode_prompt(self.tokenizer, text)  # as mlx_spec.generate encodes a templated prompt

    def reply(self, user_text: str, should_stop: Optional[Callable[[], bool]] = None) -> Iterator[GenerationResponse]:
        """Add the user's message and return the reply's token stream (a generator).

        Raises ContextFullError now, before anything changes, when the conversation would not fit. Closing the
        generator early (Ctrl-C) keeps the partial reply in the conversation and the cache consistent;
        `should_stop()` returning True during the prefill ends the reply there, with no tokens.
        """
        messages = self.messages + [{"role": "user", "content": user_text}]
        tokens = self.conversation_tokens(messages)
        room = self.max_context - len(tokens) if self.max_context else self.max_tokens
        if room <= 0:
            raise ContextFullError(f"with this message the conversation would be {len(tokens)} tokens and the "
                                   f"context holds {self.max_context} (--max-context): /reset to start a new "
                                   "conversation")
        return self._stream(messages, tokens, min(self.max_tokens, room), context_limited=room < self.max_tokens,
                            should_stop=should_stop)

    def _stream(self, messages: List[dict], tokens: List[int], max_tokens: int, context_limited: bool,
                should_stop: Optional[Callable[[], bool]] = None) -> Iterator[GenerationResponse]:
        # nothing changes until the first token is asked for, so a reply closed before it starts leaves no trace
        self.messages = messages
        seed = None if self.seed is None else self.seed + self.turns  # reproducible, not the same draws each turn
        request = Request(tokens, max_tokens=max_tokens, sampling=self.sampling, seed=seed, draft=self.drafting,
                          num_draft_tokens=self.num_draft_tokens, tree_nodes=(self.tree_nodes or 0) if self.drafting else 0,
                          strict=self.strict)
        turn = self.conversations.turn(request, should_stop=should_stop, on_prefill=self.on_prefill)
        self.turns += 1
        self.last = TurnInfo(prompt_tokens=len(tokens))
        text = []
        try:
            for r in turn:
                self.last.reused_tokens = turn.reused
                text.append(r.text)
                self.last.stats, self.last.finish_reason = r.stats, r.finish_reason
                self.last.context_full = context_limited and r.finish_reason == "length"
                yield r
        finally:
            turn.close()
            self.last.reused_tokens = turn.reused
            self.messages.append({"role": "assistant", "content": "".join(text)})


class _StopOnSigint:
    """While a reply streams: the first Ctrl-C asks it to stop after the current token, a second interrupts."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def summary_line(info: TurnInfo, drafting: bool) -> str:
    s = info.stats
    parts = [f"{s.generation_tokens} tokens", f"{s.generation_tps:.1f} tok/s"]
    if drafting and s.rounds:
        parts += [f"τ {s.tau:.2f}", f"acceptance {s.acceptance_rate:.0%}"]
    elif not drafting:
        parts.append("drafting off")
    parts.append(f"prompt {info.prompt_tokens - info.reused_tokens} new + {info.reused_tokens} cached")
    return "[" + ", ".join(parts) + "]"


class ChatUI:
    """The read-reply loop: lines from `stdin`, reply text to `stdout`, everything else to `stderr`."""

    def __init__(self, session: ChatSession, stdin=None, stdout=None, stderr=None):
        self.session = session
        self.stdin = stdin or sys.stdin
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.interactive = self.stdin is sys.stdin and _isatty(self.stdin)

    def say(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def read(self) -> Optional[str]:
        """The next line, or None at end of input (bytes that are not UTF-8 replaced, with a warning)."""
        if self.interactive:
            try:
                return valid_text(input(PROMPT), "this line")
            except EOFError:
                return None
        line = self.stdin.readline()
        return valid_text(line.rstrip("\r\n"), "this line") if line else None

    def loop(self) -> int:
        if self.interactive:
            self.say("Chat with the model; /help for commands, Ctrl-D to exit.")
        while True:
            try:
                line = self.read()
            except KeyboardInterrupt:
                self.say("\n(/quit or Ctrl-D to exit)")
                continue
            if line is None:
                if self.interactive:
                    self.say("")
                return 0
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return 0
                continue
            self.answer(line)

    def answer(self, text: str) -> None:
        stopped, stream = False, None
        with _StopOnSigint() as sigint:
            try:
                stream = self.session.reply(text, should_stop=lambda: sigint.requested)  # also mid-prefill
                for r in stream:
                    self.out.write(r.text)
                    self.out.flush()
                    if sigint.requested:
                        stopped = True
                        break
            except ContextFullError as e:
                self.say(f"context full: {e}")
                return
            except KeyboardInterrupt:
                stopped = True
            finally:
                if stream is not None:
                    stream.close()
        self.out.write("\n")
        self.out.flush()
        info = self.session.last
        if stopped:
            self.say("[stopped]")
        if info.stats is not None:
            self.say(summary_line(info, self.session.drafting))
        if info.context_full:
            self.say("the context is full, so the reply was cut: /reset to start a new conversation")

    def command(self, line: str) -> Optional[str]:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.say("new conversation" + (" (system prompt kept)" if s.system_prompt else ""))
        elif name == "/stats":
            self.stats()
        elif name == "/draft":
            if arg not in ("on", "off"):
                self.say(f"usage: /draft on|off (drafting is {'on' if s.drafting else 'off'})")
            elif arg == "on" and s.proposer is None:
                self.say("no proposer loaded: start the chat with --drafter, --draft-model or --ngram")
            else:
                s.drafting = arg == "on"
                self.say(f"drafting {arg}" + (f" ({s.proposer_name}, k={s.num_draft_tokens})" if s.drafting else ""))
        elif name == "/temp":
            try:
                temp = float(arg)
                if not 0 <= temp < float("inf"):
                    raise ValueError
            except ValueError:
                self.say(f"usage: /temp X with X >= 0, e.g. /temp 0.7 (now {s.sampling.temp})")
                return None
            s.sampling = s.sampling.with_temp(temp)
            self.say(f"temperature {temp}" + (" (greedy)" if temp == 0 else ""))
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return None

    def stats(self) -> None:
        s = self.session
        if s.last.stats is not None:
            print_stats(s.last.stats, file=self.err, drafting=s.drafting)
        else:
            self.say("no reply yet")
        draft = f"on ({s.proposer_name}, k={s.num_draft_tokens})" if s.drafting else "off"
        context = f"{len(s.cached_tokens)} of {s.max_context}" if s.max_context else f"{len(s.cached_tokens)}"
        self.say(f"Conversation: {s.turns} replies, {context} context tokens cached; drafting {draft}; "
                 f"temperature {s.sampling.temp}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mlx_spec.chat", description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--system-prompt", default=None, help="system message for the chat template")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="longest reply, in tokens")
    p.add_argument("--max-context", type=int, default=None,
                   help="most tokens a conversation may hold (default: the model's max_position_embeddings)")
    p.add_argument("--prompt-cache-file", default=None,
                   help="a saved prompt (mlx_spec.cache_prompt) that conversations starting with it continue from")
    add_kv_args(p)
    add_sampling_args(p)
    return p


def main_args(args) -> int:
    sampling = sampling_params(args)
    check_length_args(args)
    system = valid_text(args.system_prompt, "--system-prompt") if args.system_prompt else None
    tolerate_stdin()
    kv = kv_settings(args)
    check_memory(args.model, args.drafter, args.max_context or model_dir_context(args.model), kv)
    model, tokenizer, proposer = load_models(args, with_proposer=True)  # /draft on can use it after --no-draft
    saved = load_session(args.prompt_cache_file, model, kv) if args.prompt_cache_file else None
    session = ChatSession(model, tokenizer, proposer=proposer, system_prompt=system,
                          max_tokens=args.max_tokens, max_context=args.max_context, sampling=sampling, seed=args.seed,
                          num_draft_tokens=args.num_draft_tokens, drafting=not args.no_draft, tuner=make_tuner(args),
                          strict=args.strict, kv=kv, session=saved, on_prefill=PrefillProgress(),
                          tree_nodes=args.tree_nodes)
    return ChatUI(session).loop()


def main(argv=None) -> int:
    return run(main_args, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
