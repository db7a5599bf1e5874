"""What the wheel ships: the package, typed (``py.typed``), and nothing of the tests."""

from __future__ import annotations

import pytest

import subprocess
import sys
import zipfile
from pathlib import Path


@pytest.mark.multiprocess
def test_the_wheel_ships_py_typed(tmp_path):
    root = Path(__file__).parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(root)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("gradaccum-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradaccum/py.typed" in names  # users' type checkers read the hints
    assert "gradaccum/engine/deepspeed.py" in names and not any(n.startswith("tests/") for n in names)
