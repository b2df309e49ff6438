"""The package's shape: no import cycle among its modules, and no module importing another's
private (underscore) names. Read from the source with ``ast``, so lazy imports inside functions
count as much as those at the top: a cycle hidden in a function is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Installed layout: jprune/, with solvers/ and converters/ installed as jprune.solvers and
# jprune.converters (pyproject's package-dir).
PACKAGES = {"jprune": ROOT / "jprune", "jprune.solvers": ROOT / "solvers"}
PACKAGES["jprune.converters"] = ROOT / "converters"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the installed package."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.parents):
                continue  # a worktree's links to solvers/ and converters/
            relative = path.relative_to(folder).with_suffix("")
            parts = [] if relative.name == "__init__" else [relative.name]
            parts = [*relative.parent.parts, *parts]
            if package == "jprune" and parts[:1] in (["solvers"], ["converters"]):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, known: set[str]):
    """(imported module, imported name or None, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:  # ``from jprune import walk``: the module itself
                    yield submodule, None, node.lineno
                else:
                    yield source, alias.name, node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (a submodule's import of its own parent
    package's ``__init__`` is not an edge: Python runs the parent first in any case)."""
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in imports_of(module, path, known):
            if target in known and target != module and not module.startswith(f"{target}."):
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def private_imports(modules: dict[str, Path]) -> list[str]:
    """``module:line imports other._name`` for every underscore name taken from another
    module, and every import of a private module from outside its package (a package's
    ``__init__`` and its other modules may use its private modules)."""
    known = set(modules)
    found = []
    for module, path in modules.items():
        for target, name, line in imports_of(module, path, known):
            if target not in known or target == module:
                continue
            # A private module is private to its package: its siblings may import it.
            private_module = target.rsplit(".", 1)[-1].startswith("_")
            same_package = target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0]
            own_package = path.name == "__init__.py" and target.startswith(f"{module}.")
            if name is not None and name.startswith("_") and not name.startswith("__"):
                found.append(f"{module}:{line} imports {target}.{name}")
            elif private_module and not (same_package or own_package):
                found.append(f"{module}:{line} imports the private module {target}")
    return found


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    assert private_imports(package_modules()) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"jprune/a.py": "from jprune import b", "jprune/b.py": "def f():\n    import jprune.a"},
            2,
        ),
        ({"jprune/a.py": "from jprune.b import x", "jprune/b.py": "x = 1"}, None),
    ],
)
def test_the_cycle_check_sees_lazy_imports(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = {f"jprune.{Path(n).stem}": tmp_path / n for n in files}
    cycle = find_cycle(import_graph(modules))
    assert (None if cycle is None else len(set(cycle))) == expected


def test_the_private_name_check_sees_underscore_imports(tmp_path):
    (tmp_path / "a.py").write_text("def f():\n    from jprune.b import _helper\n")
    (tmp_path / "b.py").write_text("def _helper(): ...\n")
    modules = {"jprune.a": tmp_path / "a.py", "jprune.b": tmp_path / "b.py"}
    assert private_imports(modules) == ["jprune.a:2 imports jprune.b._helper"]
