"""The code runs on the Jetson's Python 3.10 while CI runs 3.11: every source file parses as 3.10 and takes nothing
from the standard library that 3.11 or 3.12 added (the names such code reaches for first)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("gemma4_agent", "launch", "benchmarks", "scripts", "test")
                 for p in (ROOT / folder).rglob("*.py")) + [ROOT / "setup.py"]
NEWER_MODULES = {"tomllib"}
NEWER_NAMES = {
    "typing": {"Self", "LiteralString", "Never", "assert_never", "assert_type", "reveal_type", "NotRequired",
               "Required", "TypeVarTuple", "Unpack", "dataclass_transform", "override", "get_overloads"},
    "enum": {"StrEnum", "ReprEnum", "EnumCheck", "FlagBoundary", "verify", "member", "nonmember", "global_enum"},
    "datetime": {"UTC"},
    "contextlib": {"chdir"},
    "hashlib": {"file_digest"},
    "asyncio": {"TaskGroup", "Runner", "timeout"},
    "itertools": {"batched"},
    "operator": {"call"},
}


def newer_than_310(tree: ast.AST) -> list[str]:
    """'line N: name' for each use of a module or name the standard library gained after 3.10."""
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in NEWER_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in NEWER_MODULES:
                names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if a.name in NEWER_NAMES.get(node.module, ())]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in NEWER_NAMES.get(node.value.id, ()):
                names.append(f"{node.value.id}.{node.attr}")
        found += [f"line {node.lineno}: {name}" for name in names]
    return found


def test_every_source_parses_as_python_310_and_uses_only_its_standard_library():
    assert len(SOURCES) > 50 and ROOT / "gemma4_agent" / "agent.py" in SOURCES  # the sources are found
    problems = {}
    for path in SOURCES:
        try:
            found = newer_than_310(ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10)))
        except SyntaxError as err:
            found = [f"line {err.lineno}: {err.msg}"]
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems


@pytest.mark.parametrize("source", ["try:\n    pass\nexcept* ValueError:\n    pass\n",
                                    "import tomllib\n", "from typing import Self\n", "import enum\nenum.StrEnum\n"])
def test_the_check_refuses_what_310_lacks(source):
    try:
        tree = ast.parse(source, feature_version=(3, 10))
    except SyntaxError:
        return
    assert newer_than_310(tree)
