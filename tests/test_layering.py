"""The packages depend one way (docs/architecture.md): spml below trainer and indexer, service
on indexer; tests and benchmarks share helpers through segsearch.testing, not each other."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "spml": ("segsearch.trainer", "segsearch.indexer", "segsearch.service"),
    "indexer": ("segsearch.trainer", "segsearch.service"),
    "service": ("segsearch.trainer",),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_one_above_it(package):
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in sorted((ROOT / package).rglob("*.py"))
                 for name in imported_modules(path) if name.startswith(FORBIDDEN[package])]
    assert offenders == []


def test_the_server_loads_no_training_code():
    code = ("import sys, segsearch.service.server, segsearch.service.router_server;"
            "print(sorted(m for m in sys.modules if m.startswith('segsearch.trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tests_and_benchmarks_do_not_import_each_other():
    """Shared helpers live in segsearch.testing. The one exception is tests/bench/, which tests
    the benchmarks' own scoring and data code (as tests/indexer tests indexer/)."""
    bench_modules = {path.stem for path in (ROOT / "bench").glob("*.py")}
    test_modules = {path.stem for path in (ROOT / "tests").rglob("*.py")} - {"conftest"}
    offenders = []
    for folder, others in (("tests", bench_modules), ("bench", test_modules)):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent == ROOT / "tests" / "bench":
                continue
            offenders += [f"{path.relative_to(ROOT)} imports {name}"
                          for name in imported_modules(path) if name.split(".")[0] in others
                          and not (folder == "bench" and name in bench_modules)]
    assert offenders == []
