"""Upload sessions of pushes to hosted repositories: one local file per session.

``uploads/<id>`` holds the bytes received so far and ``uploads/<id>.json`` the repository it
is for and when it last received bytes. Chunks are appended at the offset the client says,
so an interrupted upload resumes where the file ends, from any worker process sharing the
directory. Finishing reads the file back through the storage's verifying writer
(store.py's ``finish``, blobs.py's ``write_blob``).

**One request at a time per session, and nobody waits for it.** A request that writes to a
session (PATCH, the final PUT, DELETE) holds it: in this process (a set of busy sessions)
and across processes (an ``flock`` on the data file, taken with ``LOCK_NB``). A second
request for a busy session is refused at once with ``416 BLOB_UPLOAD_INVALID`` and the
session's current ``Range``, so a client that lost track asks again, and an attacker's
stalled chunks occupy one session, never a thread. The hold ends with the request, also
when its body stops with a disconnect (what arrived is kept).

**Abandoned sessions** idle longer than ``upload_ttl`` are swept (``sweep``, by the
server's housekeeping and by ``mirrorrouter gc``). Sweeping is idempotent and safe
beside other workers: a session is removed only under its own lock, taken without
waiting, so a session some request holds is never removed; a request that opened a
session the sweep then removed finds its file unlinked and answers ``BLOB_UPLOAD_UNKNOWN``.
A session's state file is written before its data file and removed after it, so a crash
in between leaves a state file, which the sweep removes too.
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
from mirrorrouter.hosted.limits import LimitExceeded

COPY_CHUNK = 4 * 1024 * 1024
WRITE_BATCH = 1024 * 1024  # request chunks are gathered to this size per write to disk
_UPLOAD_ID_CHARS = frozenset("0123456789abcdef")
_META = ".json"


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload session: which repository it is for and how many bytes it holds."""

    id: str
    repository: str
    size: int
    started: float


@dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep removed: sessions and their bytes."""

    sessions: int = 0
    bytes: int = 0


class UploadSessions:
    """The upload sessions of one hosted set, in a local directory."""

    def __init__(self, directory: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.uploads = directory
        self.clock = clock
        self._busy: set[str] = set()  # sessions a request of this process holds

    async def open(self) -> None:
        await asyncio.to_thread(self.uploads.mkdir, parents=True, exist_ok=True)

    async def start(self, repository: str) -> Upload:
        upload = Upload(uuid.uuid4().hex, repository, 0, self.clock())
        await self._write_meta(upload)  # first: a crash before the data file leaves only this
        fd = await asyncio.to_thread(
            os.open, self.uploads / upload.id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600
        )
        os.close(fd)
        return upload

    async def _write_meta(self, upload: Upload) -> None:
        """The session's repository, and when it last received bytes (by the injected clock:
        the sweep ends sessions idle longer than ``upload_ttl``)."""
        meta = {"repository": upload.repository, "started": upload.started, "active": self.clock()}
        await asyncio.to_thread(_write_atomic, self.uploads / f"{upload.id}{_META}", meta)

    async def get(self, repository: str, upload_id: str) -> Upload:
        """The state of an upload session of ``repository``; BLOB_UPLOAD_UNKNOWN otherwise."""
        unknown = _unknown(repository, upload_id)
        if not upload_id or not _UPLOAD_ID_CHARS.issuperset(upload_id) or len(upload_id) != 32:
            raise unknown
        try:
            meta = json.loads(
                await asyncio.to_thread((self.uploads / f"{upload_id}{_META}").read_bytes)
            )
            size = (await asyncio.to_thread(os.stat, self.uploads / upload_id)).st_size
        except (OSError, ValueError) as exc:
            raise unknown from exc
        if not isinstance(meta, dict) or meta.get("repository") != repository:
            raise unknown
        return Upload(upload_id, repository, size, float(meta.get("started", 0.0)))

    @contextlib.asynccontextmanager
    async def hold(self, upload: Upload) -> AsyncIterator[HeldSession]:
        """The session, for this request alone; refused at once (416 with the current
        ``Range``) while another request, here or in another process, holds it."""
        if upload.id in self._busy:
            raise _busy(upload.size)
        self._busy.add(upload.id)
        try:
            try:
                fd = await asyncio.to_thread(
                    os.open, self.uploads / upload.id, os.O_WRONLY | os.O_APPEND
                )
            except FileNotFoundError as exc:
                raise _unknown(upload.repository, upload.id) from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never waits
                except BlockingIOError:
                    raise _busy(os.fstat(fd).st_size) from None
                if os.fstat(fd).st_nlink == 0:  # swept or finished while we opened it
                    raise _unknown(upload.repository, upload.id)
                yield HeldSession(self, upload, fd)
            finally:
                os.close(fd)  # drops the flock
        finally:
            self._busy.discard(upload.id)

    def read(self, upload: Upload) -> AsyncIterator[bytes]:
        """The bytes the session holds, from the start."""
        return _read_file(self.uploads / upload.id)

    def count(self) -> int:
        """Open sessions (blocking I/O: call it from a thread)."""
        return sum(1 for _ in self._states())

    def held_bytes(self) -> int:
        """The bytes all open sessions hold (blocking I/O: call it from a thread)."""
        total = 0
        for upload_id in self._states():
            with contextlib.suppress(OSError):
                total += os.stat(self.uploads / upload_id).st_size
        return total

    def sweep(self, horizon: float, *, dry_run: bool = False) -> Swept:
        """Remove the sessions idle since before ``horizon`` that no request holds
        (blocking I/O: call it from a thread; it never waits for a lock)."""
        sessions = size = 0
        for upload_id in self._states():
            if _active(self.uploads / f"{upload_id}{_META}") >= horizon:
                continue
            data = self.uploads / upload_id
            try:
                fd = os.open(data, os.O_RDONLY)
            except FileNotFoundError:  # a crash between the two files: only the state is left
                if not dry_run:
                    (self.uploads / f"{upload_id}{_META}").unlink(missing_ok=True)
                sessions += 1
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a request holds it: active, whatever its state says
                # Under the lock, ask again: a request may have written and let go meanwhile.
                if os.fstat(fd).st_nlink == 0 or (
                    _active(self.uploads / f"{upload_id}{_META}") >= horizon
                ):
                    continue
                sessions += 1
                size += os.fstat(fd).st_size
                if not dry_run:
                    _remove(self.uploads, upload_id)
            finally:
                os.close(fd)
        return Swept(sessions, size)

    def _states(self) -> list[str]:
        """The ids of the sessions that have a state file."""
        ids = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.uploads):
                name = entry.name
                if name.endswith(_META) and not name.startswith("."):
                    ids.append(name.removesuffix(_META))
        return ids


class HeldSession:
    """An upload session this request holds (``UploadSessions.hold``)."""

    def __init__(self, sessions: UploadSessions, upload: Upload, fd: int) -> None:
        self._sessions = sessions
        self.upload = upload
        self._fd = fd

    @property
    def size(self) -> int:
        return os.fstat(self._fd).st_size

    async def append(self, body: AsyncIterator[bytes], start: int | None = None) -> Upload:
        """Append a chunk. ``start`` (from ``Content-Range``) must be where the upload ends:
        a chunk sent twice or out of order is refused, and the client asks where to resume.

        A client gone mid-chunk keeps what arrived; a body over a limit (``LimitExceeded``
        from ``body``) keeps nothing: the file is cut back to where the chunk began."""
        fd = self._fd
        size = begin = os.fstat(fd).st_size
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
        except LimitExceeded:
            batch.clear()
            await asyncio.to_thread(os.ftruncate, fd, begin)
            size = begin
            raise
        finally:  # also when the client went away mid-chunk: keep what arrived
            if batch:
                await asyncio.to_thread(os.write, fd, bytes(batch))
                size += len(batch)
            upload = self.upload = Upload(
                self.upload.id, self.upload.repository, size, self.upload.started
            )
            await self._sessions._write_meta(upload)
        return upload

    def read(self) -> AsyncIterator[bytes]:
        return self._sessions.read(self.upload)

    async def remove(self) -> None:
        """End the session (its data, then its state), while holding it."""
        await asyncio.to_thread(_remove, self._sessions.uploads, self.upload.id)


def upload_range(size: int) -> str:
    """The ``Range`` header of an upload: the bytes it holds (``0-0`` when empty)."""
    return f"0-{max(size - 1, 0)}"


def _busy(size: int) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UPLOAD_INVALID,
        "another request is writing to this upload; ask the upload URL where to resume",
        status=416,
        headers={"Range": upload_range(size)},
    )


def _unknown(repository: str, upload_id: str) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UPLOAD_UNKNOWN, f"no upload {upload_id} in repository {repository}"
    )


def _active(meta: Path) -> float:
    """When a session last received bytes; 0 when its state is unreadable."""
    try:
        active = json.loads(meta.read_bytes()).get("active", 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0
    return float(active) if isinstance(active, int | float) else 0.0


def _remove(uploads: Path, upload_id: str) -> None:
    for name in (upload_id, f"{upload_id}{_META}", f".{upload_id}{_META}"):
        (uploads / name).unlink(missing_ok=True)


def _write_atomic(path: Path, meta: dict[str, object]) -> None:
    temp = path.with_name(f".{path.name}")  # one request at a time writes a session's state
    temp.write_bytes(json.dumps(meta).encode())
    os.replace(temp, path)


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    with open(path, "rb") as file:  # noqa: ASYNC230 - reads happen in a thread below
        while chunk := await asyncio.to_thread(file.read, COPY_CHUNK):
            yield chunk
