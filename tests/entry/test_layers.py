"""The layers hold: import-linter's contracts in pyproject.toml (entry > stages > apps | training > data >
config > families > utils; families independent of each other; nothing above the families imports a
family's module) are kept, as `make lint` checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


def test_the_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(REPO_ROOT / "pyproject.toml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_no_code_outside_a_familys_folder_names_the_family():
    """Stages, chat, serve, config and training ask capabilities, never a family's name: `minicpm_v2`
    appears only in its own folder and in the registry."""
    allowed = {REPO_ROOT / "pipeline" / "families" / "__init__.py"}
    found = [
        f"{path.relative_to(REPO_ROOT)}:{number}"
        for path in sorted((REPO_ROOT / "pipeline").rglob("*.py"))
        if path not in allowed and (REPO_ROOT / "pipeline" / "families" / "minicpm_v2") not in path.parents
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "minicpm_v2" in line
    ]
    assert not found, found
