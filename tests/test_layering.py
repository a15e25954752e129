"""The core never imports Ray or DeepSpeed (STYLE 1): it must run and test without them."""

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parents[1] / "loramix").rglob("*.py"))
FORBIDDEN = {"ray", "deepspeed"}


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_module_imports_no_ray_or_deepspeed(path):
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    assert not found & FORBIDDEN, f"{path.name} imports {sorted(found & FORBIDDEN)}"


def test_core_modules_stay_small():
    long = {p.name: n for p in CORE if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules by concept: {long}"
