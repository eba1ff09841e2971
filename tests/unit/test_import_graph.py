"""The import graph of onerec_prod/ and jobs/: no cycles, every module imports on its own,
library code never reaches into a CLI module, CLI modules follow one naming pattern.

Why: import cycles are how a newcomer gets lost (A imports B imports A, each hiding the import
inside a function); a module that only imports when another was imported first breaks in a
fresh worker process (torchrun, Spark executors, Airflow task processes). The graph is read
from the source (``ast``), lazy imports inside functions included, so a cycle hidden in a
function is a cycle too. No Spark, no torch work: one subprocess imports each module with no
other project module loaded.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("onerec_prod", "jobs")

# library -> CLI imports still to move into the library: none left. Never add one: put the called
# code in the library instead.
PENDING_LIB_TO_CLI: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for p in sorted((REPO / top).rglob("*.py")):
            parts = list(p.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The project module ``name`` lives in (the longest known prefix), or None if external."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports anywhere in its source (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_owner(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # ``from pkg import submodule`` is an import of the submodule
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODULES else _owner(mod))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.startswith("cli_") or last.endswith("_cli") or module == "jobs.runner"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert len(MODULES) > 50 and GRAPH["jobs.build_samples"] >= {"onerec_prod.samples.builders"}
    assert _cycles(GRAPH) == []


def test_library_modules_do_not_import_cli_modules():
    bad = {(m, e) for m, es in GRAPH.items() if not _is_cli(m) for e in es if _is_cli(e)}
    assert bad <= PENDING_LIB_TO_CLI, sorted(bad - PENDING_LIB_TO_CLI)
    # jobs/ is the leaf of the Spark entry points: nothing in onerec_prod/ imports it
    assert not {(m, e) for m, es in GRAPH.items() if m.startswith("onerec_prod") for e in es
                if e.startswith("jobs")} - {("onerec_prod.cli", "jobs.runner")}


def test_cli_modules_are_named_after_their_subcommand():
    from onerec_prod.cli import COMMANDS

    for command, (module, _) in COMMANDS.items():
        last = module.rsplit(".", 1)[-1]
        if last.startswith("cli_"):
            assert last == "cli_" + command.replace("-", "_"), (command, module)


def test_every_module_imports_in_isolation():
    """Each module imported in turn with every other project module unloaded (one process)."""
    code = (
        "import importlib, json, sys\n"
        "fails = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    for k in [k for k in sys.modules if k.split('.')[0] in ('onerec_prod', 'jobs')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException as e:\n"
        "        fails[name] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(fails))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(sorted(MODULES))], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
