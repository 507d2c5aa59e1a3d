"""Model package on disk: read the manifest, verify files, hash them.

A package is a directory: ``manifest.json``, one ``model.<variant>.onnx`` graph per
variant with its weights in ``model.<variant>.onnx.data`` next to it, and the
tokenizer files. All paths in the manifest are relative, so the directory can be
moved or copied as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .contract import MANIFEST_NAME, FileEntry, Manifest, ManifestError, Variant, VariantInfo
from .errors import M3Error

_CHUNK = 8 << 20


class PackageError(M3Error, RuntimeError):
    """A package file is missing, truncated, tampered with or unreadable."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), bytes=path.stat().st_size, sha256=sha256_file(path))


@dataclass(frozen=True)
class Package:
    root: Path
    manifest: Manifest

    def variant(self, name: str) -> VariantInfo:
        try:
            return self.manifest.variants[name]
        except KeyError:
            have = ", ".join(self.manifest.variants) or "none"
            raise PackageError(f"package {self.root} has no variant {name!r} (it has: {have})") from None

    def path(self, entry: FileEntry) -> Path:
        return self.root / entry.path

    def graph_path(self, variant: Variant) -> Path:
        return self.root / self.variant(variant).graph

    def verify(self, entries: tuple[FileEntry, ...], *, full: bool = True, record: Path | None = None) -> None:
        """Check presence and size of each file; with ``full`` also its SHA-256.

        ``record``: a JSON file of files already hashed (path -> size, mtime, inode,
        SHA-256). A file whose size, modification time and inode match its record and
        whose recorded SHA-256 is the manifest's is not hashed again (hashing 1.4 GB of
        int8 weights took 1.5-2 s of a 2.4 s load); any write to the file changes its
        modification time, so it is hashed again. Files that pass are recorded."""
        seen = _read_record(record) if record is not None else {}
        changed = False
        for entry in entries:
            path = self.path(entry)
            if not path.is_file():
                raise PackageError(f"package file missing: {path}")
            st = path.stat()
            if not os.access(path, os.R_OK):
                raise PackageError(unreadable_message(path, st))
            if st.st_size != entry.bytes:
                raise PackageError(
                    f"package file {path} has {st.st_size} bytes, the manifest says {entry.bytes} "
                    "(truncated or replaced?)"
                )
            if not full:
                continue
            stamp = _stamp(st, entry)
            if seen.get(str(path)) == stamp:
                continue
            if sha256_file(path) != entry.sha256:
                raise PackageError(f"package file {path} does not match its SHA-256 in {MANIFEST_NAME} (modified?)")
            seen[str(path)] = stamp
            changed = True
        if record is not None and changed:
            _write_record(record, seen)

    def unverified(self, entries: tuple[FileEntry, ...], record: Path) -> list[FileEntry]:
        """The ``entries`` that a load would hash: not in ``record`` as they are now."""
        seen = _read_record(record)
        out = []
        for entry in entries:
            path = self.path(entry)
            try:
                st = path.stat()
            except OSError:
                out.append(entry)
                continue
            if seen.get(str(path)) != _stamp(st, entry):
                out.append(entry)
        return out

    def unreadable(self, entries: tuple[FileEntry, ...]) -> list[str]:
        """``unreadable_message`` of each of ``entries`` that exists but this user cannot read."""
        out = []
        for entry in entries:
            path = self.path(entry)
            try:
                st = path.stat()
            except OSError:
                continue
            if not os.access(path, os.R_OK):
                out.append(unreadable_message(path, st))
        return out


def unreadable_message(path: Path, st: os.stat_result) -> str:
    """Why a package file cannot be loaded by this user, and what to do about it."""
    return (
        f"package file {path} is not readable by this user (uid {os.getuid()}): mode {st.st_mode & 0o777:04o}, "
        f"owner uid {st.st_uid}; re-export the package under a umask such as 022, or `chmod -R a+rX {path.parent}`"
    )


def _stamp(st: os.stat_result, entry: FileEntry) -> list:
    """What the verification record keeps of a file: unchanged stamp, no re-hash."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, entry.sha256]


def _read_record(record: Path) -> dict[str, list]:
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(record: Path, seen: dict[str, list]) -> None:
    """Best effort (a read-only cache only costs the next load a re-hash)."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen), encoding="utf-8")
        tmp.replace(record)
    except OSError:
        pass


def load_package(root: str | Path) -> Package:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise PackageError(f"model package not found: {root} is not a directory")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(f"{manifest_path} not found: is {root} a package written by m3-export?")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"cannot read {manifest_path}: {exc}") from None
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as exc:
        raise PackageError(f"{manifest_path}: {exc}") from None
    return Package(root=root, manifest=manifest)
