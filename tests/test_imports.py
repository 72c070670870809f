"""The import contracts of pyproject.toml ([tool.importlinter]: STYLE.md item 11's layers, no circles among the
runners) checked with import-linter. export/ and runtime/ are installed as helios_deploy.export / .runtime by
package-dir mapping, which import-linter's file walk does not follow: it is run on a tree of symlinks that lays
the package out as installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(tmp_path):
    package = tmp_path / "helios_deploy"
    package.mkdir()
    for entry in (ROOT / "helios_deploy").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("export", "runtime"):
        (package / name).symlink_to(ROOT / name)
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "0 broken" in proc.stdout
    analysed = int(re.search(r"Analyzed (\d+) files", proc.stdout).group(1))
    own = sum(1 for _ in (ROOT / "helios_deploy").rglob("*.py"))
    assert analysed >= own + sum(1 for d in ("export", "runtime") for _ in (ROOT / d).rglob("*.py"))  # all walked
