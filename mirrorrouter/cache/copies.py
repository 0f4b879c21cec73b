"""Local copies of blobs an object-store cache committed (cache/objectstore/): the spool
file of a verified download, kept on local disk so this replica serves its own recent
downloads at disk speed instead of reading them back from the bucket."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from mirrorrouter.reference import Digest


class LocalCopies:
    """Local files of blobs committed by one instance, least recently used evicted first
    once they take more than ``limit`` bytes; the newest and blobs in use always stay."""

    def __init__(self, directory: Path, limit: int, in_use: Callable[[Digest], bool]) -> None:
        self._directory = directory
        self._limit = limit
        self._in_use = in_use
        self._files: OrderedDict[Digest, tuple[Path, int]] = OrderedDict()
        self._bytes = 0

    def keep(self, spool: Path, digest: Digest, size: int) -> Path:
        self._directory.mkdir(parents=True, exist_ok=True)
        target = self._directory / f"{digest.algorithm}-{digest.hex}"
        self._forget(digest)
        os.replace(spool, target)  # readers of an older copy keep its inode
        self._files[digest] = (target, size)
        self._bytes += size
        for other in list(self._files):
            if self._bytes <= self._limit:
                break
            if other != digest and not self._in_use(other):
                self.drop(other)
        return target

    def get(self, digest: Digest) -> Path | None:
        entry = self._files.get(digest)
        if entry is None:
            return None
        if not entry[0].exists():  # swept by another instance after this one closed
            self._forget(digest)
            return None
        self._files.move_to_end(digest)
        return entry[0]

    def open(self, digest: Digest) -> int | None:
        """A read-only descriptor of the local copy, if there is one."""
        path = self.get(digest)
        if path is None:
            return None
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            self._forget(digest)
            return None

    def drop(self, digest: Digest) -> None:
        entry = self._forget(digest)
        if entry is not None:
            entry[0].unlink(missing_ok=True)

    def _forget(self, digest: Digest) -> tuple[Path, int] | None:
        entry = self._files.pop(digest, None)
        if entry is not None:
            self._bytes -= entry[1]
        return entry
