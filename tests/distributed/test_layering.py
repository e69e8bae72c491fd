"""The layering the package promises, read from the source: Ray only in the runtime and the
actor modules; the schemes' cores import without it; no import from a lower layer back up to a
higher one (engine/ never imports distributed/, pipeline/ never imports downpour/, which builds
on it); and every function and class short enough to read on a screen or two."""

import ast
import pathlib
import subprocess
import sys

import pytest

import distbelief

SRC = pathlib.Path(distbelief.__file__).parent
LONGEST_FUNCTION, LONGEST_CLASS = 60, 250


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(SRC)): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def imported(tree: ast.Module) -> set[str]:
    """Every module a file imports, at the top or inside a function, by its full name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def importers(prefix: str, of: str) -> list[str]:
    """Files under `prefix` that import anything under module `of`."""
    return sorted(path for path, tree in modules().items() if path.startswith(prefix)
                  and any(m == of or m.startswith(of + ".") for m in imported(tree)))


def test_only_the_runtime_and_the_actor_modules_import_ray():
    found = importers("", "ray")
    assert found == ["distributed/downpour/actors.py", "distributed/pipeline/actors.py",
                     "distributed/runtime/calls.py", "distributed/runtime/cluster.py",
                     "distributed/runtime/snapshots.py", "distributed/runtime/startup.py",
                     "distributed/sandblaster/actors.py", "distributed/sync/actors.py"]


def test_the_engine_never_imports_the_distributed_schemes():
    assert importers("engine/", "distbelief.distributed") == []


def test_downpour_builds_on_the_pipeline_and_never_the_other_way_round():
    assert importers("distributed/pipeline/", "distbelief.distributed.downpour") == []
    assert importers("distributed/downpour/", "distbelief.distributed.pipeline")  # it does


def test_the_layering_check_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from distbelief.distributed.pipeline import x\n")
    assert imported(tree) == {"distbelief.distributed.pipeline"}


def test_no_function_or_class_is_too_long_to_read():
    long = []
    for path, tree in modules().items():
        for node in ast.walk(tree):
            limit = LONGEST_CLASS if isinstance(node, ast.ClassDef) else LONGEST_FUNCTION if \
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{path}:{node.lineno} {node.name} "
                            f"({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


@pytest.mark.subprocess  # a fresh interpreter: nothing imported yet
def test_the_cores_and_the_engine_import_without_ray():
    code = ("import sys\n"
            "import distbelief.cli, distbelief.engine, distbelief.distributed, distbelief.api\n"
            "import distbelief.distributed.downpour, distbelief.distributed.sandblaster\n"
            "import distbelief.distributed.placement, distbelief.distributed.server_model\n"
            "import distbelief.distributed.pipeline, distbelief.distributed.downpour.partitioned\n"
            "import distbelief.distributed.downpour.layout, distbelief.engine.failures\n"
            "import distbelief.distributed.sync.worker, distbelief.distributed.sync.hub\n"
            "import distbelief.distributed.downpour.rules, distbelief.distributed.wire\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
