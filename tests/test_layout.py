"""The layout's promises, checked on the source: no import cycles inside mlx_spec, the runtime never imports
the converter (only the API's convert-on-load does), surfaces do not borrow from each other, and no runtime
module reaches 500 lines."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mlx_spec"
SURFACES = {"mlx_spec.generate", "mlx_spec.chat", "mlx_spec.server", "mlx_spec.bench", "mlx_spec.doctor",
            "mlx_spec.forge"}


def modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known) -> set:
    """mlx_spec modules (and 'convert') that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known or m.split(".")[0] == "convert"}


def test_no_import_cycles_inside_mlx_spec():
    known = modules()
    graph = {n: {m for m in imports(n, p, known) if m in known and not n.startswith(m + ".")}
             for n, p in known.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    cycles = sorted(n for n in graph if n in reach(n) and not n.endswith(("__main__",)))
    assert not cycles, f"modules that import themselves through others: {cycles}"


def test_only_the_api_imports_the_converter():
    known = modules()
    users = sorted(n for n, p in known.items() if any(m.startswith("convert") for m in imports(n, p, known)))
    assert users == ["mlx_spec.api"], f"the runtime must not import convert (only api.load converts): {users}"


def test_surfaces_do_not_borrow_from_each_other():
    known = modules()
    for n, p in known.items():
        own = next((s for s in SURFACES if n == s or n.startswith(s + ".")), None)
        borrowed = {m for m in imports(n, p, known)
                    if any(m == s or m.startswith(s + ".") for s in SURFACES - {own})}
        if n == "mlx_spec":  # the package re-exports generate/stream_generate through the command's module
            borrowed.discard("mlx_spec.generate")
        assert not borrowed, f"{n} borrows from another command: {borrowed}; move the shared piece to cli.py"


def test_no_runtime_module_reaches_500_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long.items() if k >= 500}, "split modules of 500 lines or more"


TUNING = "mlx_spec.tuning"
CONTRACTS = {"mlx_spec.engine", "mlx_spec.draft_policy", "mlx_spec.proposers.base"}
# what a proposer must not know: where K/V are kept between requests, sessions, HTTP, the commands
NOT_FOR_PROPOSERS = {"mlx_spec.prompt_cache", "mlx_spec.session_file", "mlx_spec.conversation", "mlx_spec.server",
                     "mlx_spec.cache_prompt", "mlx_spec.api", "mlx_spec.cli"} | SURFACES


def _under(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_engine_and_its_plug_contracts_import_nothing_from_tuning():
    known = modules()
    borrowed = {n: m for n in CONTRACTS if n in known for m in imports(n, known[n], known) if _under(m, [TUNING])}
    assert not borrowed, f"{borrowed}: plug contracts live beside the engine, tuning/ implements them"
    assert CONTRACTS <= set(known), f"{CONTRACTS - set(known)} moved: update CONTRACTS"


def test_proposers_know_no_prompt_cache_session_server_or_command():
    known = modules()
    for n, p in sorted(known.items()):
        if _under(n, ["mlx_spec.proposers"]):
            borrowed = {m for m in imports(n, p, known) if _under(m, NOT_FOR_PROPOSERS)}
            assert not borrowed, f"{n} imports {borrowed}: move what a proposer needs down to a leaf module"


def _constants(path: Path):
    """The string constants of a module, docstrings left out (they may name what they document)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_every_drafter_family_is_declared_once():
    import re

    from mlx_spec import families

    def file_of(module_path: str) -> Path:
        return ROOT / (module_path.split(":")[0].replace(".", "/") + ".py")

    for family in families.drafter_families():
        own = {ROOT / "mlx_spec" / "families.py", file_of(family.model), file_of(family.proposer)}
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, family.model_types)) + r")\b")
        stray = sorted(f"{path.relative_to(ROOT)}: {s!r}"
                       for path in list(PACKAGE.rglob("*.py")) + list((ROOT / "convert").rglob("*.py"))
                       if path not in own for s in _constants(path) if pattern.search(s))
        assert not stray, (f"the {family.name} family's model_type is spelled outside families.py and its own model "
                           f"and proposer files (ask the registry instead): {stray}")


def test_base_capabilities_are_declared_not_probed():
    capabilities = {"producer_layers", "forward_layers", "check_layers", "forward", "family"}
    probes = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr")
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in capabilities and (node.func.id == "hasattr" or len(node.args) == 3)):
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not probes, f"ask the base what it offers (models.base.offers) or the family registry: {probes}"


def test_chunked_prefill_has_one_home():
    """The chunk size is written once (prefill.py); every prefill runs its loop."""
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and "PREFILL" in t.id]
                spelled += [f"{path.relative_to(ROOT)}: {n}" for n in names]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                spelled += [f"{path.relative_to(ROOT)}: {node.name}({a.arg}=...)" for a, d in zip(args, defaults)
                            if "prefill" in a.arg and isinstance(d, ast.Constant) and isinstance(d.value, int)]
    assert spelled == ["mlx_spec/prefill.py: PREFILL_STEP"], f"the prefill chunk is spelled in many places: {spelled}"
