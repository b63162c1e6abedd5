"""The architecture is checked, not only described (docs/ARCHITECTURE.md).

* the import contracts in pyproject.toml (``lint-imports``): no cycles, the
  server and the node never import each other, the node carries no
  simulation code, strategies/privacy/models import neither side, the
  aggregation math and the wire protocol stay free of Flower/torch;
* no module of fedlora over 400 lines and no function over 80, except those
  listed here with the reason;
* nothing outside fedlora/protocol.py defines a wire or node-config name.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedlora"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
#: Longer modules and functions, each with the reason it stays one piece.
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def test_the_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed: pip install -e '.[dev]'"
    result = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout
    assert result.stdout.count("KEPT") >= 8


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_over_400_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
        and str(p.relative_to(ROOT)) not in LONG_MODULES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def test_no_function_is_over_80_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{path.relative_to(ROOT)}:{node.name}"
                if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS:
                    long[name] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


#: A module-level assignment of a wire name: NAME = "some-key".
_WIRE = re.compile(r"^(?:KEY|METRIC|QUERY|NODE|ERROR_CODE|SECAGG|MODE)_[A-Z_]+ = ", re.M)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_wire_names_are_defined_only_in_the_protocol(path: Path) -> None:
    if path.name == "protocol.py" and path.parent == PACKAGE:
        return
    found = _WIRE.findall(path.read_text())
    assert not found, f"{path} defines wire names {found}; put them in fedlora/protocol.py"
