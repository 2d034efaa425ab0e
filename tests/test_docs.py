"""The README and docs/ as promises a newcomer relies on, checked on the text (no model, no MLX): the README
stays short, its two set-up commands are the ones CI runs, every link lands on a file and heading that
exist, every command it names is installed, and its layout block names only files that exist."""

import re
import shlex
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS, *sorted((ROOT / "tests" / "fixtures").rglob("README.md"))]
MAX_README_LINES = 300


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    out, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(path.read_text()), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path):
    """(target, anchor) of every relative markdown link outside code."""
    text = re.sub(r"`[^`\n]*`", "", prose(path.read_text()))
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        yield file, anchor


def code_lines(text: str):
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        yield from block.splitlines()


def setup_command(needle: str) -> list:
    """The README's one-line set-up command containing `needle`, as a list of &&-separated steps."""
    found = [line for line in code_lines(README.read_text())
             if line.startswith("python3 -m venv .venv &&") and needle in line]
    assert len(found) == 1, f"the README must hold exactly one set-up command with {needle!r}, found {found}"
    return [shlex.split(step) for step in found[0].split("&&")]


def without_quiet(step: list) -> list:
    """pip's -q changes what it prints, not what it installs."""
    return [w for w in step if not (step[:1] == ["pip"] and w == "-q")]


def console_scripts() -> set:
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", text, flags=re.M | re.S).group(1)
    return set(re.findall(r'^"?([\w.]+)"?\s*=', section, flags=re.M))


def layout_paths() -> list:
    """Paths in the README's layout block: a line indented 2*d names an entry at depth d, inside the last
    directory (a name ending in /) one level up; deeper indents continue a description."""
    text = README.read_text()
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, flags=re.M | re.S)
    assert block, "the README has a '## Layout' section with a code block"
    parents, out = [""], []
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent % 2 or indent // 2 >= len(parents):
            continue
        depth = indent // 2
        path = parents[depth] + line.split()[0]
        out.append(path)
        del parents[depth + 1:]
        if path.endswith("/"):
            parents.append(path)
    return out


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < MAX_README_LINES, f"the README is for a newcomer: {n} lines, keep it under {MAX_README_LINES} " \
                                 "(topics and measurements go to docs/)"


def test_main_job_command_installs_and_runs_the_shipped_pair():
    steps = setup_command("mlx_spec.generate")
    assert steps[:3] == [["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"],
                         ["pip", "install", "-e", "."]], f"the main-job command installs mlx_spec first: {steps}"
    run = steps[-1]
    assert run[0] == "mlx_spec.generate", f"the main-job command ends by running generate: {run}"
    for flag in ("--model", "--drafter"):
        path = ROOT / run[run.index(flag) + 1]
        assert (path / "config.json").is_file(), f"the main-job command's {flag} {path} is a shipped checkpoint"


def test_test_command_is_what_ci_runs():
    readme = [without_quiet(s) for s in setup_command("pytest")]
    ci = [without_quiet(shlex.split(line)) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert readme == ci, f"the README's test command and .ci/run must install and test alike:\n{readme}\n{ci}"


def test_relative_links_resolve():
    broken = []
    for md in MARKDOWN:
        for file, anchor in links(md):
            target = (md.parent / file).resolve() if file else md
            if not target.exists():
                broken.append(f"{md.relative_to(ROOT)}: {file} does not exist")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{md.relative_to(ROOT)}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, "every relative link lands on a file and heading that exist:\n" + "\n".join(broken)


def test_docs_are_all_linked_from_the_readme():
    linked = {(README.parent / f).resolve() for f, _ in links(README)}
    orphans = [d.name for d in DOCS if d.resolve() not in linked]
    assert not orphans, f"every page in docs/ is reachable from the README: {orphans}"


def test_repo_paths_named_in_docs_exist():
    missing = []
    for md in [README, *DOCS]:
        for path in re.findall(r"(?<![\w/$.-])((?:mlx_spec|convert|tests|examples|docs|\.ci)/[\w./-]*\w/?)",
                               md.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{md.relative_to(ROOT)}: {path}")
    assert not missing, "every repository path the docs name exists:\n" + "\n".join(missing)


def test_commands_in_readme_are_console_scripts():
    scripts = console_scripts()
    # a command, not a module imported in an example (`from mlx_spec.conversation import ...`)
    named = set(re.findall(r"(?<!from )(?<!import )\bmlx_spec\.\w+(?![\w.(\[])", README.read_text()))
    assert named <= scripts, f"the README names commands that pyproject.toml does not install: {named - scripts}"
    assert scripts <= named, f"every installed command gets a word in the README: {scripts - named}"


def test_layout_block_names_existing_files():
    paths = layout_paths()
    assert len(paths) > 10, f"the layout block was parsed: {paths}"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
