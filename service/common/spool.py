"""Durable files: write to a temporary name, fsync, rename, fsync the folder.

A crash at any moment leaves either the old file or the complete new one, never a
torn one. Every stage that writes something another stage reads uses this.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Persist a rename inside ``path`` (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: bytes | list[bytes], durable: bool = True) -> int:
    """Write ``chunks`` to ``path`` atomically; return the byte count.

    With ``durable`` the data and the rename are fsynced (survives power loss);
    without it a process crash still never leaves a partial file.
    """
    write_atomic_all([(path, chunks)], durable)
    return len(chunks) if isinstance(chunks, bytes) else sum(map(len, chunks))


def write_atomic_all(files: Sequence[tuple[Path, bytes | list[bytes]]], durable: bool = True) -> None:
    """:func:`write_atomic` for several files, each as atomic and durable as there,
    with one fsync per folder for the renames instead of one per file (a study's
    result objects: ten files, one folder)."""
    staged: list[tuple[str, Path]] = []
    renamed = 0
    try:
        for path, chunks in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                for part in [chunks] if isinstance(chunks, bytes) else chunks:
                    fh.write(part)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        for tmp, _ in staged[renamed:]:
            Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        for folder in dict.fromkeys(path.parent for _, path in staged):
            fsync_dir(folder)


def instance_path(spool_dir: Path, study_uid: str, sop_instance_uid: str) -> Path:
    """Where a received instance lives: one folder per study, one file per instance."""
    for uid in (study_uid, sop_instance_uid):
        if not uid or "/" in uid or uid.startswith("."):
            raise ValueError(f"{uid!r} cannot name a spool file")
    return spool_dir / study_uid / f"{sop_instance_uid}.dcm"


def free_disk_mb(path: Path) -> float:
    """Free space for an unprivileged writer on the file system holding ``path``."""
    try:
        stat = os.statvfs(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize / 2**20
