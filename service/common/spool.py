"""Durable files: write to a temporary name, fsync, rename, fsync the folder.

A crash at any moment leaves either the old file or the complete new one, never a
torn one. Every stage that writes something another stage reads uses this.
"""

from __future__ import annotations

import os
import tempfile
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
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [chunks] if isinstance(chunks, bytes) else chunks
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
                size += len(part)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return size


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
