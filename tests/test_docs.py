"""The docs say what the code does: generated or checked, never a third copy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config_table_script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts/config_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_table"] = module
    spec.loader.exec_module(module)
    return module


def test_the_readme_config_table_is_the_typed_configs_own() -> None:
    script = _config_table_script()
    readme = (ROOT / "README.md").read_text()
    assert script.readme_with_table(readme) == readme, (
        "README.md's config table differs from fedlora/config.py's help text and "
        "defaults; run: python scripts/config_table.py --write"
    )
    from fedlora.config import DEFAULTS

    for key in DEFAULTS:
        assert f"| `{key}` |" in readme, key


def test_the_architecture_map_names_every_wire_name() -> None:
    from fedlora import protocol

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = {
        v
        for k, v in vars(protocol).items()
        if k.isupper() and isinstance(v, str) and k not in ("MODE_STANDARD", "MODE_FFA")
    }
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"
    codes = {v for k, v in vars(protocol).items() if k.startswith("ERROR_CODE_")}
    assert all(str(code) in doc for code in codes)


def test_the_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text()[:2500]
    assert "bash scripts/setup.sh && .venv/bin/fedlora simulate" in head
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in head
