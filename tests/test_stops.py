"""Stop strings, weight-free: StopMatcher against a naive reference on random small alphabets (any semantic
slip shows), and a bound on the work it does for text crafted to keep nearly matching long stop strings."""

import random

import pytest

from mlx_spec.stops import StopCut, StopMatcher


class NaiveStopMatcher:
    """The reference: search the whole held text for every stop string, and hold the longest suffix that
    begins one (the matcher's semantics, at any cost)."""

    def __init__(self, stops):
        self.stops, self.pending = stops, ""

    def feed(self, text):
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self):
        out, self.pending = self.pending, ""
        return out


def random_case(rng):
    alphabet = rng.choice(["ab", "abc", "aab", "xyz\u00e9"])

    def word(lo, hi):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    stops = [word(0 if rng.random() < 0.05 else 1, 6) for _ in range(rng.randint(0, 4))]
    if stops and rng.random() < 0.2:
        stops.append(stops[0])  # duplicates
    chunks = [word(0, 5) for _ in range(rng.randint(1, 12))]
    if stops and rng.random() < 0.5:  # make a stop likely: splice one in, split anywhere
        s = rng.choice(stops)
        k = rng.randint(0, len(s))
        chunks[rng.randrange(len(chunks))] += s[:k]
        chunks.insert(rng.randrange(len(chunks) + 1), s[k:])
    return stops, chunks


def test_stop_matcher_equals_the_naive_reference_on_random_text():
    rng = random.Random(0)
    for case in range(4000):
        stops, chunks = random_case(rng)
        fast, slow = StopMatcher(list(stops)), NaiveStopMatcher(list(stops))
        for i, chunk in enumerate(chunks):  # feeding on after a stop too: it restarts on what follows
            assert fast.feed(chunk) == slow.feed(chunk), \
                f"case {case}: feed {i} of {chunks} with stops {stops}: same text released, same stop found"
            assert fast.pending == slow.pending, f"case {case}: the same tail held back"
            if rng.random() < 0.05:
                assert fast.flush() == slow.flush(), f"case {case}: flush releases the held tail"
        assert fast.flush() == slow.flush(), f"case {case}: flush releases the held tail"


@pytest.mark.parametrize("feed, want", [
    (["ab", "cST", "OPx"], ("abc", True)),
    (["S", "T", "x"], ("STx", False)),
    (["abS"], ("ab", False)),  # "S" is held back: it may begin "STOP"
    (["xSTOP"], ("x", True)),
])
def test_stop_matcher(feed, want):
    m = StopMatcher(["STOP"])
    out, hit = "", False
    for piece in feed:
        text, hit = m.feed(piece)
        out += text
        if hit:
            break
    assert (out, hit) == want, "the matcher never emits a stop string nor holds back text that cannot start one"


def test_a_longer_stop_that_began_first_wins_within_one_piece():
    m = StopMatcher(["abcd", "bc"])
    assert m.feed("a") == ("", False)
    assert m.feed("bcd") == ("", True), "the text is cut where the earliest-starting stop string begins"


class Budget:
    """Characters the matcher may read from its stop strings before the test fails (at once, so a quadratic
    matcher fails in milliseconds instead of running for minutes)."""

    def __init__(self, limit):
        self.limit, self.spent = limit, 0

    def spend(self, n):
        self.spent += n
        assert self.spent <= self.limit, f"read more than {self.limit} characters of the stop strings"


class Counted(str):
    """A stop string that charges every character read from it (indexing, slicing, prefix tests) to a budget."""

    budget = None

    def __getitem__(self, key):
        piece = str.__getitem__(self, key)
        self.budget.spend(len(piece))
        return piece

    def startswith(self, prefix, *args):
        self.budget.spend(len(prefix) if isinstance(prefix, str) else sum(map(len, prefix)))
        return str.startswith(self, prefix, *args)


def crafted(rng, n):
    """Text that keeps nearly completing its stop strings: a long run that each stop string extends but one
    character too late (the audit's 16 copies of the greedy continuation + U+0000), and periodic text whose
    stop strings fail only at their last character."""
    run = "".join(rng.choice("ab") for _ in range(n))
    return [(run, [run + "\0"] * 16 + [run[: n // 2] + "\0", run[::-1]]),
            ("ab" * (n // 2), ["ab" * (n // 4) + "c", "a" * 50 + "b", "aba" * 100 + "x"]),
            ("a" * n, ["a" * (n - 1) + "b", "a" * 1000 + "c"])]


@pytest.mark.parametrize("piece", [1, 3, 17])
def test_work_per_character_is_bounded_whatever_the_stop_strings_length(piece):
    """The stop check must read O(1) characters of each stop string per character fed, amortized (8 by the
    automaton's count: 1 prefix test, 3 matching, 4 building its table), and hold back less than the longest
    stop string: re-scanning the held tail on every token made such a request cost O(output^3), holding the
    only worker for minutes."""
    rng = random.Random(1)
    for text, stops in crafted(rng, 20_000):
        Counted.budget = Budget(8 * len(text) * len(set(stops)))
        m = StopMatcher([Counted(s) for s in stops])
        out = ""
        for i in range(0, len(text), piece):
            released, hit = m.feed(text[i : i + piece])
            out += released
            assert not hit, "none of these stop strings occurs"
            assert len(m.pending) < max(map(len, stops)), "the held tail is shorter than the longest stop string"
        out += m.flush()
        assert out == text, "all the text comes out once no stop string can complete"


def test_logprobs_stop_where_the_text_stops():
    """StopCut, token by token as the worker feeds it: a token's logprobs are sent with the text that
    releases its first character, never before; at a stop-string cut exactly the tokens whose text starts
    before the cut are kept (a straddling token is in, the stop string's own tokens are out), so every
    text_offset lies within the text; without a stop, every token is kept."""
    rng = random.Random(2)
    for case in range(3000):
        stops, _ = random_case(rng)
        alphabet = "".join(set("".join(stops))) or "ab"
        tokens = ["".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 1, 2, 3]))) for _ in range(10)]
        cut, naive = StopCut(list(stops)), NaiveStopMatcher(list(stops))
        text, kept, starts, hit = "", [], [], False
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            starts.append(cut.offset)
            out, items, hit = cut.feed(token, i, last=last)
            want, want_hit = naive.feed(token)
            want += naive.flush() if last and not want_hit else ""
            assert (out, hit) == (want, want_hit), f"case {case}: the text is StopMatcher's"
            text += out
            for j in items:
                assert starts[j] < len(text) or last and not hit, \
                    f"case {case}: token {j} is sent with (or after) its first character"
            held = [j for j in range(i + 1) if j not in kept + items]
            assert all(starts[j] >= len(text) for j in held) or last, f"case {case}: and not later than that"
            kept += items
            if hit:
                break
        assert kept == list(range(len(kept))), f"case {case}: tokens are kept in order, none skipped"
        if hit:
            assert kept == [j for j in range(len(starts)) if starts[j] < len(text)], \
                f"case {case}: {tokens} / {stops}: kept iff the token's text starts before the cut"
        else:
            assert kept == list(range(len(tokens))), f"case {case}: no stop: every token is kept"
