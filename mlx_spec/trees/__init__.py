"""Draft trees: several candidates where the drafter is unsure, verified in the round's one base pass.

A chain is a tree with one child per node. A proposer that can build trees returns a `Draft` with
`parents` (proposers/base.py); the engine verifies `[bonus] + nodes` in one pass, each node at position
(round position + its depth) and seeing the cached prefix and its own ancestors only, accepts the longest
branch the base agrees with, and compacts that branch's K/V into consecutive positions.

    shape.py     a tree's structure on the device: depth, ancestors, sibling order, from its parents
    views.py     the verify pass's view of the base's caches: node positions and the tree mask
    accept.py    acceptance on a tree (pure): follow the base's own token; multi-candidate rejection
    grow.py      the best-first builder from a drafter's distributions (MTP steps, DFlash/DSpark blocks)
    ranks.py     how often a node's r-th child is kept, learnt per request (how sampled trees spend nodes)
    ngram.py     prompt-lookup continuations merged into one tree
    round.py     one tree round in the Engine: propose, verify, accept, compact, emit

Knows caches, positions and token ids; nothing of text, surfaces or policies.
"""
