"""The layout's promises: imports run one way, top to bottom (cli, web → tools → ops → worker →
pipelines → engine → the public declarations → ledger, config), with no cycle; and the engine
runs without Celery, kombu or any pipeline."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Container
from pathlib import Path

import jobs

#: Each part of `jobs`, lowest first: a module may import its own part and those below it.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset(
        {
            "jobs.errors",
            "jobs.retry",
            "jobs.limits",
            "jobs.pipelines",
            "jobs.maps",
            "jobs.waits",
            "jobs.signals",
            "jobs.events",
            "jobs.outside",
            "jobs.provider",
        }
    ),
    frozenset({"jobs.engine"}),
    frozenset({"jobs.orders", "jobs.places", "jobs.sandbox"}),
    frozenset({"jobs.worker"}),
    # `exactly_once` for any Celery app: above the engine it runs calls through, below the
    # surfaces that show them (ops), apart from `jobs.worker` (which builds oncelery's app).
    frozenset({"jobs.tasks"}),
    frozenset({"jobs.ops"}),
    frozenset({"jobs.tools"}),
    frozenset({"jobs.web"}),
    frozenset({"jobs.cli"}),
    # The facade: the package itself re-exports the public API, and `python -m jobs`; the
    # client (`enqueue`, `wait`) publishes through the worker and reads history through ops.
    frozenset({"jobs", "jobs.__main__", "jobs.client"}),
)

JOBS = Path(jobs.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(JOBS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: Container[str]) -> set[str]:
    """Every `jobs` module `path` imports, at its top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from jobs.worker import tasks` imports the module `jobs.worker.tasks`; its
            # package's `__init__` runs first, but that is Python's order, not a dependency.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            submodules = [name for name in names if name in modules]
            found.update(submodules or [node.module])
    return {name for name in found if name == "jobs" or name.startswith("jobs.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in JOBS.rglob("*.py")}
    return {
        name: {imported for imported in _imports(path, modules) if imported in modules}
        for name, path in modules.items()
    }


def _layer(module: str) -> int:
    best = None
    for index, parts in enumerate(LAYERS):
        for part in parts:
            inside = module == part or module.startswith(part + ".")
            if inside and (best is None or len(part) > best[1]):
                best = (index, len(part))
    assert best is not None, f"{module} belongs to no layer of tests/unit/jobs/test_layout.py"
    return best[0]


def test_imports_run_one_way() -> None:
    upward = [
        f"{module} imports {imported}"
        for module, imported_modules in sorted(_graph().items())
        for imported in sorted(imported_modules)
        if _layer(imported) > _layer(module)
    ]
    assert upward == []


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            # A package imports its own modules to re-export them; its modules may import
            # one another's public names through it only if that is not a loop.
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_engine_imports_no_celery_kombu_or_pipeline() -> None:
    engine = sorted(_module_name(path) for path in (JOBS / "engine").rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {engine!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'celery', 'kombu', 'billiard'} or m.startswith(('jobs.orders', 'jobs.worker', "
        "'jobs.ops', 'jobs.web', 'jobs.cli', 'jobs.tools')))\n"
        "print(loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout
