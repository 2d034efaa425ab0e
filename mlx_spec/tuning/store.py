"""The costs file: measured costs kept per machine + MLX build + model + proposer, measured on first use.

`$XDG_CACHE_HOME/mlx_spec/tuning.json` (default ~/.cache/...). A `CostsStore` is an object its owner keeps
(the CLI, a chat, a server): it remembers what it read or measured, and the identities it computed, for
as long as its owner does. Nothing is kept at module level.

The file is read as untrusted input: a damaged one (not JSON, nested too deeply, an entry of the wrong
shape, a cost that is not a finite number) is moved aside to `tuning.damaged-<time>.json`, with one warning,
and the costs are measured afresh; where it cannot be moved, it is ignored and left as it is. A file of an
older format is replaced without a word: its measurements are meant to be redone.

An entry holds a single request's costs by proposer (`proposers`) and a batch's costs by proposer and
width (`widths`: {proposer: {B: WidthCosts}}, each width measured when a batch first needs it). A file
without `widths` (written before batches) reads as no width measured yet; its other costs stay valid.
"""

import dataclasses
import json
import math
import os
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from ..cache import KVQuant
from ..identity import machine_identity, model_identity, short_hash
from ..paths import cache_root
from .batch_costs import WidthCosts
from .costs import Costs
from .probe import measure_costs
from .width_probe import measure_width

CACHE_VERSION = 2  # 2: the compiled draft stepper made drafting cheaper; re-measure


def default_path() -> Path:
    return cache_root() / "tuning.json"


def _empty() -> dict:
    return {"version": CACHE_VERSION, "entries": {}}


def _read(path: Path) -> Tuple[dict, Optional[str]]:
    """(the file's data, or empty data; what is wrong with the file, None when nothing is). A missing file or
    one of an older format is empty data, not damage."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return _empty(), None
    except RecursionError:
        return _empty(), "nested too deeply"
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        return _empty(), f"unreadable: {str(e)[:120]}"
    version = data.get("version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version != CACHE_VERSION:
        return _empty(), None
    problem = _damage(data)
    return (data, None) if problem is None else (_empty(), problem)


def _damage(data) -> Optional[str]:
    """What makes the costs file's data unusable, or None: every entry is checked here, so that reading one
    later cannot fail."""
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return "not a costs file: no format version"
    if not isinstance(data.get("entries"), dict):
        return "not a table of entries"
    for entry in data["entries"].values():
        if not isinstance(entry, dict) or not isinstance(entry.get("proposers"), dict):
            return "an entry is not a table of proposers"
        for stored in entry["proposers"].values():
            try:
                costs = Costs.from_json(stored)
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                return "an entry's costs are unreadable"
            rest = [costs.draft_fixed, costs.draft_step, costs.plain_step_s]
            if not (costs.verify and all(math.isfinite(v) and v > 0 for v in [*costs.verify, *costs.tree.values()])
                    and all(math.isfinite(v) and v >= 0 for v in rest)):
                return "an entry's costs are not finite positive numbers"
    return None


def _write(path: Path, data: dict) -> None:
    """Atomically (a reader never sees half a file); a read-only cache directory is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


class CostsStore:
    """Costs for (model, proposer) on this machine: from memory, else the file, else measured and saved."""

    def __init__(self, path: Optional[Path] = None, *, clock: Callable[[], float] = time.perf_counter,
                 log: Optional[Callable[[str], None]] = None, measure=measure_costs, measure_width=measure_width):
        """`log`: where to say that a first use stops to measure (the CLI passes stderr; a library call
        stays silent). `measure`, `measure_width`: the probes (tests pass fakes)."""
        self.path = Path(path) if path is not None else default_path()
        self.clock, self.log, self.measure, self.measure_width = clock, log, measure, measure_width
        self._lock = threading.Lock()
        self._costs: Dict[Tuple[str, str], Costs] = {}
        self._widths: Dict[Tuple[str, str], Dict[int, WidthCosts]] = {}
        self._identities: Dict[int, Tuple[weakref.ref, dict]] = {}
        self._machine: Optional[dict] = None
        self._keep_file = False  # a damaged file that could not be moved aside: never written over

    # -- identities (computed once per model object)
    def model_identity(self, model) -> dict:
        hit = self._identities.get(id(model))
        if hit is not None and hit[0]() is model:
            return hit[1]
        ident = model_identity(model)
        self._identities[id(model)] = (weakref.ref(model), ident)
        return ident

    def machine(self) -> dict:
        if self._machine is None:
            self._machine = machine_identity()
        return self._machine

    def key(self, model) -> str:
        machine = {k: v for k, v in self.machine().items() if k != "device_info"}
        return short_hash([machine, self.model_identity(model)])

    # -- costs
    def get(self, model, proposer=None, *, refresh: bool = False, kv: Optional[KVQuant] = None,
            tree_budgets: Sequence[int] = (), **measure_kw) -> Costs:
        """`refresh=True` measures again (and saves). `kv`: costs with quantized K/V (its attention costs
        differ), measured and filed on their own. `tree_budgets`: the chain costs (got as without them) with
        tree rounds of these many nodes and verify passes of their rows added (filed on their own, measured
        on first use of trees), so auto with trees decides between chains exactly as auto without them."""
        if tree_budgets:
            return self._with_trees(model, proposer, refresh, kv, tuple(tree_budgets), measure_kw)
        key, pid = self.key(model), _pid(proposer, kv)
        if kv is not None:
            measure_kw = dict(measure_kw, kv=kv)
        return self._get(model, proposer, key, pid, refresh, measure_kw)

    def _with_trees(self, model, proposer, refresh: bool, kv, budgets, measure_kw) -> Costs:
        chain = self.get(model, proposer, refresh=refresh, kv=kv, **measure_kw)
        pid = f"{_pid(proposer, kv)}|trees{','.join(map(str, budgets))}"
        trees = self._get(model, proposer, self.key(model), pid, refresh, dict(measure_kw, kv=kv, tree_budgets=budgets))
        return dataclasses.replace(chain, verify=chain.verify + trees.verify[len(chain.verify):], tree=trees.tree)

    def _get(self, model, proposer, key: str, pid: str, refresh: bool, measure_kw: dict) -> Costs:
        with self._lock:
            if not refresh and (key, pid) in self._costs:
                return self._costs[key, pid]
            stored = (self._load()["entries"].get(key) or {}).get("proposers", {}).get(pid)
            if not refresh and stored is not None:
                costs = Costs.from_json(stored)
            else:
                if not refresh and self.log is not None:  # a first use pauses for seconds on a slow machine
                    self.log(f"[mlx_spec] measuring this machine for --num-draft-tokens auto (first use of this "
                             f"model and proposer here; cached in {self.path})")
                costs = self.measure(model, proposer, clock=self.clock, **measure_kw)
                self._save(model, key, pid, costs)
            self._costs[key, pid] = costs
            return costs

    def _save(self, model, key: str, pid: str, costs: Costs, rows: Optional[int] = None) -> None:
        """File `costs` under the entry's proposers, or under its widths at `rows`."""
        data = self._load()  # re-read: another process may have written meanwhile
        entry = data["entries"].setdefault(key, {"machine": self.machine(), "model": self.model_identity(model),
                                                 "proposers": {}})
        stamped = dict(costs.to_json(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if rows is None:
            entry.setdefault("proposers", {})[pid] = stamped
        else:
            entry.setdefault("widths", {}).setdefault(pid, {})[str(rows)] = stamped
        if not self._keep_file:
            _write(self.path, data)

    # -- costs by width (a batch's rounds)
    def widths(self, model, proposer, kv: Optional[KVQuant] = None) -> Dict[int, WidthCosts]:
        """{B: costs} measured so far for this pair (quantized K/V rows: `kv`), from memory or the file.
        The dict is the store's: `measure_width_now` adds to it."""
        key, pid = self.key(model), _pid(proposer, kv, start=False)
        with self._lock:
            if (key, pid) not in self._widths:
                stored = ((self._load()["entries"].get(key) or {}).get("widths") or {}).get(pid) or {}
                self._widths[key, pid] = _widths_from_json(stored)
            return self._widths[key, pid]

    def measure_width_now(self, model, proposer, rows: int, kv: Optional[KVQuant] = None) -> WidthCosts:
        """Measure this width now (a batch reached it first), remember it and save it."""
        table = self.widths(model, proposer, kv)
        key, pid = self.key(model), _pid(proposer, kv, start=False)
        if self.log is not None:
            self.log(f"[mlx_spec] measuring batched rounds of {rows} rows on this machine (first use; cached in "
                     f"{self.path})")
        costs = self.measure_width(model, proposer, rows, kv=kv, clock=self.clock)
        with self._lock:
            table[rows] = costs
            self._save(model, key, pid, costs, rows)
        return costs

    # -- a damaged file
    def _load(self) -> dict:
        data, problem = _read(self.path)
        if problem is not None and not self._keep_file:
            self._set_aside(problem)
        return data

    def _set_aside(self, problem: str) -> None:
        """Move a damaged costs file aside (never delete what the user has) and say so once."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.stem}.damaged-{stamp}{self.path.suffix}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.stem}.damaged-{stamp}-{n}{self.path.suffix}")
        try:
            os.rename(self.path, aside)
            done = f"moved it to {aside}"
        except FileNotFoundError:  # another process moved it first (and said so)
            return
        except OSError as e:
            self._keep_file = True
            done = f"it cannot be moved aside ({e.strerror or e}), so it is ignored and left as it is"
        self._warn(f"warning: the costs file {self.path} is damaged ({problem}); {done}; its costs are measured "
                   "again")

    def _warn(self, line: str) -> None:
        if self.log is not None:
            self.log(line)
        else:  # a library call: Python's warning machinery, which the caller controls
            warnings.warn(line, RuntimeWarning, stacklevel=2)


def _pid(proposer, kv: Optional[KVQuant], start: bool = True) -> str:
    """What costs are filed under: the proposer's identity, and the K/V quantization (its attention costs
    differ). A batch's quantized rows are quantized from their first position, so `start` is left out."""
    pid = proposer.identity if proposer is not None else "none"
    if kv is not None:
        pid += f"|kv{kv.bits}g{kv.group_size}" + (f"s{kv.start}" if start else "")
    return pid


def _widths_from_json(stored: dict) -> Dict[int, WidthCosts]:
    """The widths an entry holds; one that does not parse (a hand edit, a future field) is measured again."""
    out = {}
    for rows, d in stored.items() if isinstance(stored, dict) else ():
        try:
            out[int(rows)] = WidthCosts.from_json(d)
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
    return out
