"""Image files, content-addressed: `images/ab/cd/<sha256>.png`, written and fsynced before their row commits."""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreamloom.errors import DreamloomError


@dataclass(frozen=True)
class StoredFile:
    """A file in the store: its hash and path relative to the store root."""

    sha256: str
    path: str
    size: int


@dataclass
class SweepReport:
    """What a startup sweep found: files no row refers to (removed) and rows whose file is missing."""

    orphans_removed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class ImageStore:
    """Files named by their sha256: the same bytes are stored once, and a rerun job finds its files already there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def relative_path(self, sha256: str, suffix: str = ".png") -> str:
        """Where a file with this hash lives, relative to the root."""
        return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"

    def put(self, data: bytes, suffix: str = ".png") -> StoredFile:
        """Store `data` durably (temporary file, fsync, rename, fsync of the folder); idempotent."""
        sha256 = hashlib.sha256(data).hexdigest()
        relative = self.relative_path(sha256, suffix)
        target = self.root / relative
        if target.is_file() and target.stat().st_size == len(data):
            return StoredFile(sha256, relative, len(data))
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return StoredFile(sha256, relative, len(data))

    def path(self, relative: str) -> Path:
        """The absolute path of a stored file; refuses anything that would leave the store."""
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root) or candidate == self.root:
            raise DreamloomError("That image path is outside the image store.")
        return candidate

    def read(self, relative: str) -> bytes:
        """The bytes of a stored file."""
        path = self.path(relative)
        if not path.is_file():
            raise DreamloomError(f"The image file {relative} is missing from the image store.")
        return path.read_bytes()

    def sweep(self, referenced: set[str], grace_seconds: float = 60.0) -> SweepReport:
        """Remove files no row refers to (older than `grace_seconds`, so in-flight writes survive); report missing ones."""
        report = SweepReport()
        now = time.time()
        present = set()
        for path in self.root.rglob("*"):
            if not path.is_file():
                continue
            relative = path.relative_to(self.root).as_posix()
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if now - path.stat().st_mtime > grace_seconds:
                    path.unlink(missing_ok=True)
                continue
            present.add(relative)
            if relative not in referenced and now - path.stat().st_mtime > grace_seconds:
                path.unlink(missing_ok=True)
                report.orphans_removed.append(relative)
        report.missing = sorted(referenced - present)
        return report
