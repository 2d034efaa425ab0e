"""Prompt-lookup trees: the continuations of several earlier matches of the history's end, merged.

The chain's lookup (proposers/ngram.py) takes what followed the most recent match of the longest suffix;
a tree also takes what followed other matches (older ones, then shorter suffixes), merged into a trie, so
where the text branched before, each branch is a candidate. The first continuation is the chain's, so a
tree's first branch is the chain. Built on the host from the history (no device value is read); the nodes
are deterministic (no draft distribution: the rejection rule treats them as one-hot, exactly).
"""

from typing import Dict, Iterator, List, Tuple


def continuations(history: List[int], n: int, depth: int, min_n: int = 1) -> Iterator[List[int]]:
    """What followed each earlier match of the last `size` tokens, for size = n down to min_n, most recent
    match first (up to `depth` tokens each)."""
    for size in range(min(n, len(history) - 1), min_n - 1, -1):
        suffix = history[-size:]
        for start in range(len(history) - size - 1, -1, -1):
            if history[start : start + size] == suffix:
                follow = history[start + size : start + size + depth]
                if follow:
                    yield follow


def lookup_tree(history: List[int], n: int, nodes: int, depth: int) -> Tuple[List[int], List[int]]:
    """(tokens, parents) of a trie of at most `nodes` nodes over the continuations, in insertion order
    (a parent before its children, siblings in the order found); empty when nothing matches."""
    tokens: List[int] = []
    parents: List[int] = []
    children: Dict[int, Dict[int, int]] = {}
    for follow in continuations(history, n, depth):
        at = -1
        for t in follow:
            kids = children.setdefault(at, {})
            if t not in kids:
                if len(tokens) == nodes:
                    return tokens, parents
                kids[t] = len(tokens)
                tokens.append(t)
                parents.append(at)
            at = kids[t]
    return tokens, parents
