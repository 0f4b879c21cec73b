"""Upload sessions of pushes to hosted repositories: one local file per session.

``uploads/<id>`` holds the bytes received so far and ``uploads/<id>.json`` the repository it
is for and when it last received bytes. Chunks are appended at the offset the client says
(one at a time, under an ``flock``), so an interrupted upload resumes where the file ends,
from any worker process sharing the directory. Finishing reads the file back through the
storage's verifying writer (hosted.py); sessions idle longer than a grace period are
collected with the garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from mirrorrouter.errors import ErrorCode, RegistryError

COPY_CHUNK = 4 * 1024 * 1024
WRITE_BATCH = 1024 * 1024  # request chunks are gathered to this size per write to disk
_UPLOAD_ID_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload session: which repository it is for and how many bytes it holds."""

    id: str
    repository: str
    size: int
    started: float


class UploadSessions:
    """The upload sessions of one hosted set, in a local directory."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.uploads = directory
        self.clock = clock

    async def open(self) -> None:
        await asyncio.to_thread(self.uploads.mkdir, parents=True, exist_ok=True)

    async def start(self, repository: str) -> Upload:
        upload = Upload(uuid.uuid4().hex, repository, 0, self.clock())
        await asyncio.to_thread((self.uploads / upload.id).touch)
        await self._write_meta(upload)
        return upload

    async def _write_meta(self, upload: Upload) -> None:
        """The session's repository, and when it last received bytes (by the injected clock:
        garbage collection ends sessions idle longer than ``gc_grace``)."""
        meta = {"repository": upload.repository, "started": upload.started, "active": self.clock()}
        temp = self.uploads / f".{upload.id}.json"
        await asyncio.to_thread(temp.write_bytes, json.dumps(meta).encode())
        await asyncio.to_thread(os.replace, temp, self.uploads / f"{upload.id}.json")

    async def get(self, repository: str, upload_id: str) -> Upload:
        """The state of an upload session of ``repository``; BLOB_UPLOAD_UNKNOWN otherwise."""
        unknown = RegistryError(
            ErrorCode.BLOB_UPLOAD_UNKNOWN, f"no upload {upload_id} in repository {repository}"
        )
        if not upload_id or not _UPLOAD_ID_CHARS.issuperset(upload_id) or len(upload_id) != 32:
            raise unknown
        try:
            meta = json.loads(
                await asyncio.to_thread((self.uploads / f"{upload_id}.json").read_bytes)
            )
            size = (await asyncio.to_thread(os.stat, self.uploads / upload_id)).st_size
        except (OSError, ValueError) as exc:
            raise unknown from exc
        if not isinstance(meta, dict) or meta.get("repository") != repository:
            raise unknown
        return Upload(upload_id, repository, size, float(meta.get("started", 0.0)))

    async def append(
        self, upload: Upload, body: AsyncIterator[bytes], start: int | None = None
    ) -> Upload:
        """Append a chunk. ``start`` (from ``Content-Range``) must be where the upload ends:
        a chunk sent twice or out of order is refused, and the client asks where to resume."""
        path = self.uploads / upload.id
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_APPEND)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)  # one chunk at a time
            size = os.fstat(fd).st_size
            if start is not None and start != size:
                raise RegistryError(
                    ErrorCode.BLOB_UPLOAD_INVALID,
                    f"the chunk starts at byte {start}, but the upload holds {size} bytes",
                    status=416,
                    headers={"Range": upload_range(size)},
                )
            batch = bytearray()
            try:
                async for chunk in body:
                    batch += chunk
                    if len(batch) >= WRITE_BATCH:
                        await asyncio.to_thread(os.write, fd, bytes(batch))
                        size += len(batch)
                        batch.clear()
            finally:  # also when the client went away mid-chunk: keep what arrived
                if batch:
                    await asyncio.to_thread(os.write, fd, bytes(batch))
                    size += len(batch)
        finally:
            os.close(fd)
        upload = Upload(upload.id, upload.repository, size, upload.started)
        await self._write_meta(upload)
        return upload

    async def cancel(self, upload: Upload) -> None:
        for name in (upload.id, f"{upload.id}.json"):
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, self.uploads / name)

    def read(self, upload: Upload) -> AsyncIterator[bytes]:
        """The bytes the session holds, from the start."""
        return _read_file(self.uploads / upload.id)

    def stale(self, horizon: float) -> list[Path]:
        """Upload sessions idle since before ``horizon``: their data and state files."""
        stale = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.uploads):
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                try:
                    active = json.loads(Path(entry.path).read_bytes()).get("active", 0.0)
                except (OSError, ValueError, AttributeError):
                    active = 0.0
                if isinstance(active, int | float) and active < horizon:
                    upload_id = entry.name.removesuffix(".json")
                    stale.append(self.uploads / upload_id)
                    stale.append(Path(entry.path))
        return stale


def upload_range(size: int) -> str:
    """The ``Range`` header of an upload: the bytes it holds (``0-0`` when empty)."""
    return f"0-{max(size - 1, 0)}"


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as file:  # noqa: ASYNC230 - reads happen in a thread below
        while chunk := await asyncio.to_thread(file.read, COPY_CHUNK):
            yield chunk
