"""The import graph keeps its layers: stages never import stages; no module imports a layer above its own.

Parsed from the sources (imports inside functions count too), so a lazy import cannot hide an edge.
The layers are the ones ARCHITECTURE.md draws ("Layers"); ``LAYERS`` below is that drawing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sftflow.keys import imported_modules

REPO = Path(__file__).resolve().parents[2]

# Lowest first. A module may import its own layer and those below, never one above. A module
# belongs to the layer of the longest prefix that names it (``sftflow.data.wrappers``, a leaf of
# prompt templates that ``config`` validates against, sits in ``base``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("sftflow", "sftflow.digests", "sftflow.errors", "sftflow.layout", "sftflow.tagnames",
              "sftflow.progress", "sftflow.masking", "sftflow.data.wrappers")),
    ("config", ("sftflow.config", "sftflow.config_sections", "sftflow.run_options", "sftflow.stats",
                "sftflow.engine")),
    ("data", ("sftflow.data", "sftflow.results", "sftflow.breakdown", "sftflow.gate", "sftflow.keys",
              "sftflow.markers")),
    ("inference", ("sftflow.inference",)),
    ("recipes", ("sftflow.training", "sftflow.augment", "sftflow.evaluation", "sftflow.rejection")),
    ("tracking", ("sftflow.tracking",)),
    ("ops", ("sftflow.ops",)),
    ("tasks", ("tasks",)),
    ("flows", ("flows",)),
]
_PACKAGES = ("sftflow", "tasks", "flows")


def _layer(module: str) -> int | None:
    """Index in ``LAYERS`` of ``module`` (longest matching prefix), or None when no layer names it."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            matches = module == p or (module.startswith(p + ".") and p != "sftflow")
            if matches and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def _is_project_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return name.split(".")[0] in _PACKAGES and (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file())


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


def _all_modules() -> list[Path]:
    return sorted(p for folder in _PACKAGES for p in (REPO / folder).rglob("*.py"))


def _own_name(path: Path) -> str:
    name = _module_name(path)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


@pytest.mark.parametrize("path", _all_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    me = _own_name(path)
    mine = _layer(me)
    assert mine is not None, f"{me} is in no layer: add it to LAYERS here and to ARCHITECTURE.md's Layers"
    up = sorted(f"{m} ({LAYERS[_layer(m)][0]})" for m in _imports(path)
                if _is_project_module(m) and _layer(m) is not None and _layer(m) > mine)
    assert not up, (f"{me} ({LAYERS[mine][0]}) imports a layer above it: {up}. Move what they share down "
                    f"(ARCHITECTURE.md, Layers)")


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    # A tracking module importing the ops layer (what tracking/runs.py once did) is an upward edge.
    assert _layer("sftflow.tracking.runs") < _layer("sftflow.ops.cachekeys")
    assert _layer("sftflow.data.wrappers") < _layer("sftflow.config") < _layer("sftflow.data.refs")
    assert _layer("sftflow") == 0 and _layer("sftflow.digests") == 0 and _layer("sftflow.nope") is None


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


MAX_LINES = 600


def _size_exceptions() -> set[str]:
    """The modules ARCHITECTURE.md's "Module size" table lets grow past ``MAX_LINES`` (with its reason)."""
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Module size", 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}


def test_no_module_over_600_lines_unless_architecture_says_why() -> None:
    allowed = _size_exceptions()
    assert "sftflow/data/minhash.py" in allowed  # the parser reads the table
    paths = [p for d in ("sftflow", "tasks", "flows") for p in (REPO / d).rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in paths
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    unexplained = sorted(f"{m} ({n} lines)" for m, n in long.items() if m not in allowed)
    assert not unexplained, (f"over {MAX_LINES} lines with no reason in ARCHITECTURE.md (Module size): "
                             f"{unexplained}; split it or say why there")
    stale = sorted(allowed - set(long))
    assert not stale, f"ARCHITECTURE.md (Module size) lists modules that are no longer long: {stale}"
