"""The house rules that drift without anyone noticing: imports that point one way, files of one job,
few switches, docs that stay short."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fpd_convert"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Modules of the package a file imports, at its top or inside a function (a lazy import that
    breaks a circle at run time is still a circle in the design)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("fpd_convert"):
                found.add(mod)
                for alias in node.names:  # `from . import dedup` imports a module
                    found.add(f"{mod}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fpd_convert")}
    return found


def test_no_import_circle_in_the_package():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}
    # a package's __init__ importing its own submodules is the package's face, not a circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not (files[name].name == "__init__.py" and m.startswith(name + "."))}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_the_cli_and_the_math_no_io():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        text = path.read_text()
        assert not re.search(r"^\s*from \.+cli import|^\s*import fpd_convert\.cli", text, re.M), path
    for path in (PACKAGE / "tt").rglob("*.py"):
        text = path.read_text()
        for banned in ("checkpoints", "torch.nn", "safetensors", "click", "..data", "..convert"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, (path, banned)


def test_no_file_over_400_lines_without_a_reason_at_its_top():
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            assert "longer than 400 lines because" in "\n".join(lines[:30]), (path, len(lines))


def test_at_most_three_environment_switches_each_documented():
    switches = set()
    for path in PACKAGE.rglob("*.py"):
        switches |= set(re.findall(r"FPD_[A-Z0-9_]+", path.read_text()))
    assert len(switches) <= 3, sorted(switches)
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    for s in switches:
        assert s in docs, f"{s} is not documented in docs/"


def test_readme_and_benchmarks_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
    assert len((ROOT / "docs" / "benchmarks.md").read_text().splitlines()) <= 250


def test_ci_holds_run_and_one_device_check():
    assert sorted(p.name for p in (ROOT / ".ci").iterdir() if p.name != "__pycache__") == ["device-check.sh", "run"]
