"""Every test that starts processes or runs Triton kernels carries its marker (pyproject.toml lists them), so
`-m distributed`, `-m "not subprocess"` and `-m "not interpreter"` select what they say and a new test cannot
forget its marker.

Read from the test modules' source, nothing imported or run. A test needs
- `subprocess` when it reaches a call of the subprocess module,
- `distributed` when it reaches torch.multiprocessing's process start (dist_harness.spawn) or torchrun,
- `interpreter` when it reaches an import of a Triton kernel module of lowmem.kernels (one whose file holds a
  `@jit` kernel) or asks for `kernels: triton`;
"reaches" following the names a test, its decorators and its fixtures use to the functions, classes and
constants of its module and of the test helpers (conftest.py, dist_harness.py). A module-level `pytestmark`
or the test's own decorator counts.
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
HELPERS = ("conftest", "dist_harness")
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
PROCESS_STARTS = {"start_processes", "spawn"}  # torch.multiprocessing's
LAUNCHERS = {"torchrun", "torch.distributed.run"}
KERNEL_MODULES = frozenset(p.stem for p in (TESTS.parent / "kernels").glob("*.py")
                           if any(line.strip() == "@jit" for line in p.read_text().splitlines()))
KINDS = ("distributed", "interpreter", "subprocess")


def module_symbols(tree: ast.Module) -> dict[str, ast.AST]:
    """name -> the top-level node that binds it (a function, class, assignment or import)."""
    symbols: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            symbols[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        symbols[name.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                symbols[(alias.asname or alias.name).split(".")[0]] = node
    return symbols


def _imports_kernels(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.startswith("lowmem.kernels.") and a.name.split(".")[2] in KERNEL_MODULES
                   for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.module:
        parts = node.module.split(".")
        if parts[:2] == ["lowmem", "kernels"]:
            return (len(parts) > 2 and parts[2] in KERNEL_MODULES) or any(a.name in KERNEL_MODULES
                                                                         for a in node.names)
    return False


def _triton_asked(node: ast.AST) -> bool:
    if isinstance(node, ast.Dict):
        return any(isinstance(k, ast.Constant) and k.value == "kernels" and isinstance(v, ast.Constant)
                   and v.value == "triton" for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.keyword):
        return node.arg == "kernels" and isinstance(node.value, ast.Constant) and node.value.value == "triton"
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and "kernels=triton" in node.value


def own_kinds(node: ast.AST) -> set[str]:
    """What this node itself does (its nested code included, the symbols it names not)."""
    kinds = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
            if sub.value.id == "subprocess" and sub.attr in SUBPROCESS_CALLS:
                kinds.add("subprocess")
            if sub.value.id in ("mp", "multiprocessing") and sub.attr in PROCESS_STARTS:
                kinds.add("distributed")
        elif isinstance(sub, ast.ImportFrom) and sub.module == "subprocess":
            kinds.add("subprocess")
        elif isinstance(sub, ast.Constant) and sub.value in LAUNCHERS:
            kinds.add("distributed")
        if _imports_kernels(sub) or _triton_asked(sub):
            kinds.add("interpreter")
    return kinds


def used_names(node: ast.AST) -> set[str]:
    names = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names |= {a.arg for a in node.args.args + node.args.kwonlyargs}  # fixtures
    return names


def marks_of(decorators: list[ast.expr]) -> set[str]:
    """The X of each `pytest.mark.X` or `pytest.mark.X(...)` in this list (a mark on some parameters only,
    pytest.param(..., marks=...), is not the test's)."""
    found = set()
    for expr in decorators:
        mark = expr.func if isinstance(expr, ast.Call) else expr
        if (isinstance(mark, ast.Attribute) and isinstance(mark.value, ast.Attribute) and mark.value.attr == "mark"
                and isinstance(mark.value.value, ast.Name) and mark.value.value.id == "pytest"):
            found.add(mark.attr)
    return found


def module_marks(tree: ast.Module) -> set[str]:
    """The marks of `pytestmark = pytest.mark.X` or `pytestmark = [pytest.mark.X, ...]`."""
    values = [node.value for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)]
    return marks_of([e for v in values for e in (v.elts if isinstance(v, (ast.List, ast.Tuple)) else [v])])


def needed_kinds(test: ast.FunctionDef, symbols: dict[str, ast.AST], helpers: dict[str, dict[str, ast.AST]]) -> set[str]:
    """What `test` does, through every symbol of its module or of a helper module it reaches."""
    def resolve(name: str, scope: dict[str, ast.AST]) -> ast.AST | None:
        node = scope.get(name)
        if isinstance(node, ast.ImportFrom) and node.module in helpers:
            return helpers[node.module].get(name)  # a helper's function, not the import line
        if node is None and scope is symbols:
            return helpers.get("conftest", {}).get(name)  # a conftest fixture
        return node

    seen: set[int] = set()
    todo: list[tuple[ast.AST, dict[str, ast.AST]]] = [(test, symbols)]
    kinds: set[str] = set()
    while todo:
        node, scope = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        kinds |= own_kinds(node)
        node_scope = next((h for h in helpers.values() if node in h.values()), scope)
        for name in used_names(node):
            target = resolve(name, node_scope)
            if target is not None:
                todo.append((target, node_scope))
    return kinds


def missing_marks(source: str, helpers: dict[str, dict[str, ast.AST]]) -> dict[str, set[str]]:
    """test name -> the markers it needs and lacks."""
    tree = ast.parse(source)
    symbols, present = module_symbols(tree), module_marks(tree)
    missing = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            lacking = needed_kinds(node, symbols, helpers) - present - marks_of(node.decorator_list)
            if lacking:
                missing[node.name] = lacking
    return missing


def helper_symbols() -> dict[str, dict[str, ast.AST]]:
    return {name: module_symbols(ast.parse((TESTS / f"{name}.py").read_text())) for name in HELPERS}


def test_every_test_that_starts_processes_or_runs_kernels_carries_its_marker():
    helpers = helper_symbols()
    modules = [path for path in sorted(TESTS.rglob("test_*.py")) if path.name != Path(__file__).name]  # not this
    missing = {f"{path.relative_to(TESTS)}::{test}": sorted(kinds) for path in modules  # one, whose patterns are its data
               for test, kinds in missing_marks(path.read_text(), helpers).items()}
    assert not missing, f"tests lacking their markers (see pyproject.toml's markers): {missing}"


def test_the_check_finds_each_kind_where_a_marker_is_missing():
    """The check itself: each kind is found directly, through a helper of the module, through a fixture and
    through dist_harness; a marker on the test or the module satisfies it."""
    helpers = helper_symbols()
    source = '''
import subprocess
import pytest
from dist_harness import spawn
from lowmem.kernels import adam as ka
from lowmem.kernels import dispatch

def run_script():
    return subprocess.run(["python", "-c", "pass"])

@pytest.fixture
def started():
    return run_script()

def test_direct():
    subprocess.run(["python"])

def test_through_a_helper():
    run_script()

def test_through_a_fixture(started):
    pass

def test_ranks():
    spawn(print, 2)

def test_torchrun():
    subprocess.run(["python", "-m", "torch.distributed.run", "x.py"])

def test_kernel():
    ka.adam_update()

def test_kernels_option():
    build({"name": "galore", "kernels": "triton"})

def test_dispatch_alone():
    dispatch.resolve_backend("triton", "cpu")

@pytest.mark.subprocess
def test_marked():
    run_script()
'''
    assert missing_marks(source, helpers) == {
        "test_direct": {"subprocess"}, "test_through_a_helper": {"subprocess"},
        "test_through_a_fixture": {"subprocess"}, "test_ranks": {"distributed"},
        "test_torchrun": {"subprocess", "distributed"}, "test_kernel": {"interpreter"},
        "test_kernels_option": {"interpreter"}}
    marked = source.replace("import pytest\n", "import pytest\npytestmark = [pytest.mark.subprocess, "
                                                "pytest.mark.distributed, pytest.mark.interpreter]\n")
    assert missing_marks(marked, helpers) == {}
