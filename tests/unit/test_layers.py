"""recsys_lib imports downward only: a module may import its own layer or one below, never above.

Read with `ast`, nothing imported; imports inside functions (lazy ones) count too. Dynamic
imports (`run.launch.resolve`, which imports whatever a job file names) are not seen.
"""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "recsys_lib"

#: first to last; the top-level module or package of recsys_lib -> its layer
LAYERS = [
    ("__init__", "errors", "config", "dist"),   # __init__: the package root (it imports nothing)
    ("data",),
    ("protocol",),
    ("models",),
    ("run",),
    ("stage2", "report"),     # neither imports the other
    ("params",),              # checks --set against the config dataclasses of models, protocol, stage2
    ("pipeline",),
    ("worker", "__main__"),   # entry points (torchrun, `python -m recsys_lib`): they need every stage
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def top(module: str) -> str:
    """`recsys_lib.stage2.features` -> `stage2`; the root `recsys_lib` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(rel_path: str, source: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every recsys_lib import in the file at `rel_path`
    (relative to the repository root, e.g. `recsys_lib/data/load.py`)."""
    package = list(Path(rel_path).parent.parts)          # what `from .` means, for any file
    found = []
    for node in ast.walk(ast.parse(source, filename=rel_path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "recsys_lib":       # `from recsys_lib import x` / `from . import x` at the root
                found += [(node.lineno, f"recsys_lib.{a.name}" if a.name in LAYER_OF else module)
                          for a in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, m) for line, m in found if m == "recsys_lib" or m.startswith("recsys_lib.")]


def upward_imports(rel_path: str, source: str) -> list[str]:
    """One line for each import of a module in a higher layer than the file's own."""
    own = top(".".join(Path(rel_path).with_suffix("").parts))
    problems = []
    for line, module in imported_modules(rel_path, source):
        theirs = top(module)
        if theirs not in LAYER_OF:
            problems.append(f"{rel_path}:{line}: imports {module}, which is in no layer of LAYERS")
        elif LAYER_OF[theirs] > LAYER_OF[own]:
            problems.append(f"{rel_path}:{line}: {own} (layer {LAYER_OF[own]}) imports {module} "
                            f"({theirs}, layer {LAYER_OF[theirs]}), a higher layer")
    return problems


def library_files() -> list[tuple[str, str]]:
    return [(str(p.relative_to(LIB.parent)), p.read_text()) for p in sorted(LIB.rglob("*.py"))]


def test_every_module_has_a_layer():
    unplaced = {top(".".join(Path(rel).with_suffix("").parts)) for rel, _ in library_files()} - set(LAYER_OF)
    assert not unplaced, f"place these in LAYERS (tests/unit/test_layers.py): {sorted(unplaced)}"


def test_no_module_imports_from_a_higher_layer():
    files = library_files()
    assert sum(len(imported_modules(rel, src)) for rel, src in files) > 100, "the parser finds the imports"
    problems = [p for rel, src in files for p in upward_imports(rel, src)]
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_checker_reports_an_upward_import():
    source = ("from ..config import PROJECT_ROOT\n"          # down: fine
              "from .load import load\n"                     # own layer: fine
              "import recsys_lib.report.tables\n"            # up, absolute
              "def f():\n"
              "    from ..stage2 import features\n"          # up, relative and lazy
              "    from recsys_lib import pipeline\n")       # up, from the root
    problems = upward_imports("recsys_lib/data/x.py", source)
    assert len(problems) == 3, problems
    assert problems[0] == ("recsys_lib/data/x.py:3: data (layer 1) imports recsys_lib.report.tables "
                           "(report, layer 5), a higher layer")
    assert "x.py:5: data (layer 1) imports recsys_lib.stage2 (stage2, layer 5)" in problems[1]
    assert "x.py:6: data (layer 1) imports recsys_lib.pipeline (pipeline, layer 7)" in problems[2]
    assert upward_imports("recsys_lib/pipeline.py", "import recsys_lib.report.tables\nfrom .data import load\n") == []
    assert upward_imports("recsys_lib/data/__init__.py", "from .. import nowhere\n") == []   # a root name
    assert "in no layer" in upward_imports("recsys_lib/data/x.py", "import recsys_lib.nowhere\n")[0]
