"""The import graph keeps its layers: stages never import stages; the library never imports up.

Parsed from the sources (imports inside functions count too), so a lazy import cannot hide an edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sftflow.ops.cachekeys import imported_modules

REPO = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (inside functions too; relative ones made absolute).

    The same parser the cache keys use to find a stage's code closure: one definition of "imports".
    """
    return imported_modules(path, REPO)


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if p.name != "__init__.py")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


@pytest.mark.parametrize("path", _modules("tasks"), ids=lambda p: p.name)
def test_stages_never_import_other_stages(path: Path) -> None:
    me = _module_name(path)
    stages = {_module_name(p) for p in _modules("tasks")} - {me}
    edges = sorted(m for m in _imports(path) if m in stages or any(m.startswith(s + ".") for s in stages))
    assert not edges, f"{me} imports other stage module(s) {edges}: move what they share into sftflow/"


@pytest.mark.parametrize("path", _modules("sftflow"), ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_stages_or_flows(path: Path) -> None:
    up = sorted(m for m in _imports(path) if m.split(".")[0] in ("tasks", "flows"))
    assert not up, f"{_module_name(path)} imports {up}: the library (sftflow/) sits below tasks/ and flows/"


def test_the_graph_parser_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # The rule above is only as good as the parser: a function-level and a relative import must count.
    (tmp_path / "tasks").mkdir()
    p = tmp_path / "tasks" / "_probe.py"
    p.write_text("def f():\n    from tasks.ingest import x\n    from . import dedup\n")
    found = imported_modules(p, tmp_path)
    assert "tasks.ingest" in found and "tasks.dedup" in found


def test_registered_model_class_does_not_need_prefect() -> None:
    # The MLflow model pickles its class by reference: that module must import without Prefect
    # (so the model loads where this repository's orchestration layer is not installed).
    from sftflow.tracking import chat_model, registry  # noqa: F401 - the import is the point

    for name in ("registry.py", "chat_model.py"):
        path = REPO / "sftflow" / "tracking" / name
        assert "prefect" not in {m.split(".")[0] for m in _imports(path)}, path
