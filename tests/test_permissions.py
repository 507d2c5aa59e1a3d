"""Packages deploy as a non-root user: every file written with the umask's permissions.

A package exported by root (CI, a Docker build) must load as the unprivileged user that
serves it. Where ``setpriv`` exists and the tests run as root, the runtime really runs
as ``nobody`` on a package root exported.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CHECKPOINT

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CAN_SWITCH_USER = shutil.which("setpriv") is not None and os.geteuid() == 0


def _export(out: Path, umask: int, **kwargs) -> None:
    from m3_exporter import export_package

    old = os.umask(umask)
    try:
        export_package(str(CHECKPOINT), out, say=lambda _m: None, **kwargs)
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in paths}


def _as_nobody(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([*NOBODY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A folder every user may enter (pytest's own are 0700), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="m3-perms-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.exporter
def test_every_package_file_follows_the_umask(shared_dir: Path) -> None:
    out = shared_dir / "pkg-022"
    _export(out, 0o022)
    modes = _modes(out)
    assert any(name.endswith(".onnx.data") for name in modes)
    wrong = {name: f"{mode:04o}" for name, mode in modes.items() if mode != (0o755 if (out / name).is_dir() else 0o644)}
    assert not wrong, wrong

    strict = shared_dir / "pkg-077"
    _export(strict, 0o077, variants=["fp32"], validate_variants=False)
    wrong = {
        name: f"{mode:04o}"
        for name, mode in _modes(strict).items()
        if mode != (0o700 if (strict / name).is_dir() else 0o600)
    }
    assert not wrong, wrong


@pytest.mark.exporter
@pytest.mark.skipif(not CAN_SWITCH_USER, reason="needs root and setpriv to run the runtime as another user")
def test_a_package_exported_by_root_loads_as_another_user(shared_dir: Path) -> None:
    out = shared_dir / "pkg-022"
    if not out.exists():
        _export(out, 0o022)
    work = shared_dir / "nobody-home"
    work.mkdir(exist_ok=True)
    os.chown(work, 65534, 65534)
    code = (
        "import sys; from m3_runtime import M3Model; "
        "m = M3Model(sys.argv[1], variant=sys.argv[2]); print(m.encode(['hello'])['dense_vecs'].shape)"
    )
    for variant in ("fp32", "int8"):
        done = _as_nobody([sys.executable, "-c", code, str(out), variant], work)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("(1, ")


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="needs root and setpriv to run the runtime as another user")
def test_m3_info_and_load_name_an_unreadable_file(package_dir: Path, shared_dir: Path) -> None:
    pkg = shared_dir / "unreadable"
    shutil.copytree(package_dir, pkg)
    for p in (pkg, *pkg.rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
    data = pkg / "model.fp32.onnx.data"
    data.chmod(0o600)
    work = shared_dir / "nobody-info"
    work.mkdir(exist_ok=True)
    os.chown(work, 65534, 65534)

    info = _as_nobody([sys.executable, "-m", "m3_runtime.cli", "info", str(pkg)], work)
    assert info.returncode == 0, info.stderr
    flagged = [line for line in info.stdout.splitlines() if "UNREADABLE" in line]
    assert len(flagged) == 1, info.stdout
    assert str(data) in flagged[0] and "mode 0600" in flagged[0] and "owner uid 0" in flagged[0]

    load = _as_nobody([sys.executable, "-m", "m3_runtime.cli", "encode", str(pkg), "--variant", "fp32", "hi"], work)
    assert load.returncode == 2
    assert f"package file {data} is not readable by this user (uid 65534): mode 0600" in load.stderr


def test_an_unreadable_file_is_named_without_switching_user(package_dir: Path, monkeypatch, capsys) -> None:
    """The same messages where the tests cannot switch user (root reads every file, so
    this user's access check is what is replaced)."""
    from m3_runtime import M3Model
    from m3_runtime import package as package_module
    from m3_runtime.cli import main
    from m3_runtime.package import PackageError

    data = (package_dir / "model.fp32.onnx.data").resolve()
    real_access = os.access
    monkeypatch.setattr(package_module.os, "access", lambda p, mode: Path(p) != data and real_access(p, mode))
    assert main(["info", str(package_dir)]) == 0
    flagged = [line for line in capsys.readouterr().out.splitlines() if "UNREADABLE" in line]
    assert len(flagged) == 1 and f"package file {data} is not readable by this user" in flagged[0]
    with pytest.raises(PackageError, match=rf"package file {data} is not readable by this user \(uid \d+\): mode 0"):
        M3Model(package_dir, variant="fp32")
    M3Model(package_dir, variant="int8")  # the other variants' files are readable
