"""The layers the imports show: ring/, then the checkpoint stream, then the agents, then scenarios/.

Read from the source with ast (nothing is imported), so a new arrow back up the layers fails here
with the file and line that drew it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("ring", "checkpointer", "replica", "pair", "scenarios")          # each may import only those before it
# What the replica may take from checkpointer/: the shared stream and the agent runtime, not the
# primary's internals.
SHARED = {"checkpointer", "checkpointer.protocol", "checkpointer.wire", "checkpointer.frames",
          "checkpointer.messages", "checkpointer.schema", "checkpointer.codec", "checkpointer.runtime",
          "checkpointer.config", "checkpointer.security", "checkpointer.launch",
          "checkpointer.guest", "checkpointer.fencing", "checkpointer.output"}


def _imports(path: Path):
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            yield node.lineno, base, [alias.name for alias in node.names]


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", ORDER)
def test_no_import_runs_back_up_the_layers(package: str) -> None:
    above = ORDER[ORDER.index(package) + 1:]
    arrows = [f"{path.relative_to(ROOT)}:{line} imports {module}"
              for path in _sources(package) for line, module, _ in _imports(path)
              if module.split(".")[0] in above]
    assert not arrows, "imports back up the layers:\n" + "\n".join(arrows)


def test_the_replica_takes_only_the_shared_stream_and_runtime_from_checkpointer() -> None:
    arrows = []
    for path in _sources("replica"):
        for line, module, names in _imports(path):
            if module.split(".")[0] != "checkpointer":
                continue
            taken = [module] if module != "checkpointer" else [f"checkpointer.{n}" for n in names]
            arrows += [f"{path.relative_to(ROOT)}:{line} imports {t}" for t in taken if t not in SHARED]
    assert not arrows, "the replica reaches into the primary:\n" + "\n".join(arrows)


def test_no_private_name_is_imported_across_modules() -> None:
    arrows = [f"{path.relative_to(ROOT)}:{line} imports {name} from {module}"
              for package in ORDER + ("tests",) for path in _sources(package)
              for line, module, names in _imports(path) for name in names
              if name.startswith("_") and not name.startswith("__")]
    assert not arrows, "private helpers imported across modules:\n" + "\n".join(arrows)


def test_machines_are_built_only_in_ring_backend() -> None:
    builders = {"KvmMachine", "SimMachine"}
    calls = [f"{path.relative_to(ROOT)}:{node.lineno} builds a machine"
             for package in ORDER for path in _sources(package) if path != ROOT / "ring" / "backend.py"
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and (getattr(node.func, "id", None) in builders
                                                or getattr(node.func, "attr", None) in builders)]
    assert not calls, "machines built outside ring.backend:\n" + "\n".join(calls)
