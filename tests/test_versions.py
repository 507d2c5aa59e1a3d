"""``m3 --version`` and ``m3-export --version`` print the installed distributions' versions."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command, dist", [("m3", "m3-runtime"), pytest.param("m3-export", "m3-exporter", marks=pytest.mark.exporter)]
)
def test_version(command, dist):
    out = subprocess.run([str(BIN / command), "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{command} ({dist}) {version(dist)}"
