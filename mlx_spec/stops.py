"""One request's stop strings: where its streamed text is cut, and which tokens' logprobs survive the cut.

`StopMatcher` cuts the text at the first stop string and holds back only a tail that could still become one.
Each stop string is a Knuth-Morris-Pratt automaton whose state is the longest suffix of the text so far that
is a prefix of the string, so a character costs O(1) amortized per stop string whatever the strings' length,
and the held tail is at most the longest stop minus one character. `LogprobGate` holds each token's logprobs
until the first character of its text is released, and drops those the cut leaves out. `StopCut` is the two
together, fed token by token.

Knows characters and text positions; nothing of tokenizers, engines or HTTP. A worker keeps one StopCut per
request (a batched worker, one per row; the API one per request).
"""

from collections import deque
from typing import Generic, List, Optional, Tuple, TypeVar

T = TypeVar("T")


class _Stop:
    """One stop string and how much of it the text now ends with."""

    __slots__ = ("s", "state", "_border", "_k")

    def __init__(self, s: str):
        self.s, self.state = s, 0
        self._border: List[int] = [0]  # _border[i]: longest proper prefix of s[:i+1] that is also its suffix
        self._k = 0

    def border(self, i: int) -> int:
        """_border[i], the table built lazily: only as far as the text ever followed the string, so a huge
        stop string costs nothing until the text matches it."""
        s, b, k = self.s, self._border, self._k
        while len(b) <= i:
            c = s[len(b)]
            while k and s[k] != c:
                k = b[k - 1]
            if s[k] == c:
                k += 1
            b.append(k)
        self._k = k
        return b[i]

    def advance(self, text: str) -> int:
        """Feed `text`: the index in `text` just past the first completed occurrence of the string, or -1."""
        s, j = self.s, self.state
        if s.startswith(text, j) and j + len(text) < len(s):  # still following the string: one C compare
            self.state = j + len(text)
            return -1
        for i, c in enumerate(text):
            while j and s[j] != c:
                j = self.border(j - 1)
            if s[j] == c:
                j += 1
                if j == len(s):
                    self.state = j
                    return i + 1
        self.state = j
        return -1


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that may still become one.

    `fed`: characters fed so far; `emitted`: characters returned so far (after a stop: where the text was
    cut)."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self._automata = [_Stop(s) for s in dict.fromkeys(stops) if s]
        self._empty = "" in stops  # matches at once, before any text
        self.pending = ""
        self.fed = self.emitted = 0

    def feed(self, text: str) -> Tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        self.fed += len(text)
        base = len(self.pending)
        self.pending += text
        if self._empty:
            return self._cut(0)
        if not self._automata:
            return self._release(len(self.pending))
        cut = None
        for a in self._automata:  # every string: a longer one that began earlier may complete in this text
            end = a.advance(text)
            if end >= 0:
                start = base + end - len(a.s)  # never inside released text: that tail would have been held
                cut = start if cut is None else min(cut, start)
        if cut is not None:
            return self._cut(cut)
        hold = max(a.state for a in self._automata)  # <= len(pending): no state reaches past the held tail
        return self._release(len(self.pending) - hold)

    def flush(self) -> str:
        out, _ = self._release(len(self.pending))
        self._reset()
        return out

    def _release(self, n: int) -> Tuple[str, bool]:
        out, self.pending = self.pending[:n], self.pending[n:]
        self.emitted += n
        return out, False

    def _cut(self, n: int) -> Tuple[str, bool]:
        out, _ = self._release(n)
        self.pending = ""
        self._reset()
        return out, True

    def _reset(self) -> None:
        """Forget the text (as after a stop or a flush): what comes next is matched on its own."""
        for a in self._automata:
            a.state = 0


class LogprobGate(Generic[T]):
    """Each token's logprobs, held until the first character of its text is released.

    The rule at a stop-string cut: a token is in the response iff its text starts before the cut, that is
    iff some of its text is in the text the client gets (a token that straddles the cut is in; one wholly
    inside or after the stop string is out). So every kept token's text_offset lies within the text, and
    every character of the text belongs to a kept token. A token with no text of its own (one byte of a
    character) starts where the character does, so it goes with it. vLLM drops tokens by where their text
    starts too, but at the end of the stop string rather than at the cut: it keeps the stop string's tokens."""

    def __init__(self):
        self._held: deque = deque()  # (where the token's text starts in the stream, its item)

    def add(self, start: int, item: T) -> None:
        self._held.append((start, item))

    def release(self, upto: Optional[int]) -> List[T]:
        """The held items whose text starts before `upto` (None: all of them, the text is complete)."""
        out = []
        while self._held and (upto is None or self._held[0][0] < upto):
            out.append(self._held.popleft()[1])
        return out


class StopCut(Generic[T]):
    """One request's generated text through its stop strings, token by token: the text to send now, the
    tokens' items (logprobs) that go with it, and whether a stop string ended the request."""

    def __init__(self, stops: List[str]):
        self.matcher, self.gate = StopMatcher(stops), LogprobGate()

    @property
    def offset(self) -> int:
        """Where the next token's text starts in the generated text (its text_offset)."""
        return self.matcher.fed

    def feed(self, text: str, item: Optional[T] = None, last: bool = False) -> Tuple[str, List[T], bool]:
        """A token's text (and its item, None for none); `last`: the generation ends with it, so nothing is
        held back. Returns (text to send, items to send with it, whether a stop string was found)."""
        if item is not None:
            self.gate.add(self.matcher.fed, item)
        out, hit = self.matcher.feed(text)
        if last and not hit:
            out += self.matcher.flush()
            return out, self.gate.release(None), False
        return out, self.gate.release(self.matcher.emitted), hit
