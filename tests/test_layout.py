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
