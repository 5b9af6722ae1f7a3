"""The package's layers: no import cycles, and the core never imports a subpackage.

Reads every module's imports from its source (module level and inside functions alike, since a
local import is still a dependency), without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "softprompt"
SUBPACKAGES = ("training", "serving", "compare")
ENTRY_POINTS = ("softprompt", "softprompt.cli")  # may import anything: they sit above every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The softprompt modules ``path`` imports (``from softprompt.x import y`` counts y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, known) - {module_name(f)} for f in files}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def is_core(module: str) -> bool:
    parts = module.split(".")
    entry = module in ENTRY_POINTS or module.startswith("softprompt.cli.")  # the command line's modules
    return not entry and (len(parts) < 2 or parts[1] not in SUBPACKAGES)


def test_the_checker_finds_a_cycle_and_a_layer_violation():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert is_core("softprompt.model") and not is_core("softprompt.training.loop")
    assert not is_core("softprompt.cli") and not is_core("softprompt.cli.commands")


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 20, "the walker found too few modules"
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_core_modules_do_not_import_subpackages(sub):
    edges = graph()
    bad = sorted(
        f"{m} imports {t}" for m, targets in edges.items() if is_core(m) for t in targets if not is_core(t)
    )
    assert not bad, "the core must not depend on training, serving or compare: " + "; ".join(bad)


def test_subpackages_do_not_import_each_other_except_compare_uses_training():
    edges = graph()
    allowed = {("compare", "training")}
    bad = []
    for m, targets in edges.items():
        for t in targets:
            a, b = m.split(".")[1:2], t.split(".")[1:2]
            if (
                a
                and b
                and a[0] in SUBPACKAGES
                and b[0] in SUBPACKAGES
                and a != b
                and (a[0], b[0]) not in allowed
            ):
                bad.append(f"{m} imports {t}")
    assert not bad, "; ".join(bad)


# The model's modules: PromptedLM, the transformers pieces it relies on, loading a model, and its
# token vectors. Only they may name transformers' internals.
MODEL_MODULES = ("model.py", "hf_parts.py", "loading.py", "embedding.py")
INTERNALS = (
    "DynamicCache",  # caches
    "GradientCheckpointingLayer",  # layer classes
    "AutoModelForCausalLM",  # loading a model
    "AutoConfig",
    "_attn_implementation",  # private config fields
    "get_text_config",  # config fields
    "quantization_config",
    "max_position_embeddings",
    "num_hidden_layers",
)


def test_transformers_internals_stay_in_the_model_modules():
    """Only the model's modules reach into transformers' internals (caches, layer classes, loading,
    configs' fields); everything else asks PromptedLM, softprompt.hf_parts or softprompt.loading."""
    bad = [
        f"{f.relative_to(PACKAGE)}: {word}"
        for f in PACKAGE.rglob("*.py")
        if f.relative_to(PACKAGE).as_posix() not in MODEL_MODULES
        for word in INTERNALS
        if word in f.read_text()
    ]
    assert not bad, "; ".join(bad)


def test_the_internals_check_reads_the_model_modules():
    """Guards the check above against a rename: every model module exists, and every name it looks
    for is used in one of them (a name nobody uses would check nothing)."""
    texts = [(PACKAGE / name).read_text() for name in MODEL_MODULES]
    unused = [word for word in INTERNALS if not any(word in text for text in texts)]
    assert not unused, unused
