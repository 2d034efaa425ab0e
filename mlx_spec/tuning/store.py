"""The costs file: measured costs kept per machine + MLX build + model + proposer, measured on first use.

`$XDG_CACHE_HOME/mlx_spec/tuning.json` (default ~/.cache/...). A `CostsStore` is an object its owner keeps
(the CLI, a chat, a server): it remembers what it read or measured, and the identities it computed, for
as long as its owner does. Nothing is kept at module level.
"""

import dataclasses
import json
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from ..cache import KVQuant
from ..identity import machine_identity, model_identity, short_hash
from ..paths import cache_root
from .costs import Costs
from .probe import measure_costs

CACHE_VERSION = 2  # 2: the compiled draft stepper made drafting cheaper; re-measure


def default_path() -> Path:
    return cache_root() / "tuning.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data
    except (OSError, ValueError):
        pass  # missing or unreadable: measure again and rewrite it
    return {"version": CACHE_VERSION, "entries": {}}


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
                 log: Optional[Callable[[str], None]] = None, measure=measure_costs):
        """`log`: where to say that a first use stops to measure (the CLI passes stderr; a library call
        stays silent). `measure`: the probe (tests pass a fake)."""
        self.path = Path(path) if path is not None else default_path()
        self.clock, self.log, self.measure = clock, log, measure
        self._lock = threading.Lock()
        self._costs: Dict[Tuple[str, str], Costs] = {}
        self._identities: Dict[int, Tuple[weakref.ref, dict]] = {}
        self._machine: Optional[dict] = None

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
        key, pid = self.key(model), proposer.identity if proposer is not None else "none"
        if kv is not None:
            pid, measure_kw = f"{pid}|kv{kv.bits}g{kv.group_size}s{kv.start}", dict(measure_kw, kv=kv)
        return self._get(model, proposer, key, pid, refresh, measure_kw)

    def _with_trees(self, model, proposer, refresh: bool, kv, budgets, measure_kw) -> Costs:
        chain = self.get(model, proposer, refresh=refresh, kv=kv, **measure_kw)
        pid = f"{proposer.identity}|" + (f"kv{kv.bits}g{kv.group_size}s{kv.start}|" if kv is not None else "") \
            + f"trees{','.join(map(str, budgets))}"
        trees = self._get(model, proposer, self.key(model), pid, refresh, dict(measure_kw, kv=kv, tree_budgets=budgets))
        return dataclasses.replace(chain, verify=chain.verify + trees.verify[len(chain.verify):], tree=trees.tree)

    def _get(self, model, proposer, key: str, pid: str, refresh: bool, measure_kw: dict) -> Costs:
        with self._lock:
            if not refresh and (key, pid) in self._costs:
                return self._costs[key, pid]
            stored = (_read(self.path)["entries"].get(key) or {}).get("proposers", {}).get(pid)
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

    def _save(self, model, key: str, pid: str, costs: Costs) -> None:
        data = _read(self.path)  # re-read: another process may have written meanwhile
        entry = data["entries"].setdefault(key, {"machine": self.machine(), "model": self.model_identity(model),
                                                 "proposers": {}})
        entry["proposers"][pid] = dict(costs.to_json(), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write(self.path, data)
