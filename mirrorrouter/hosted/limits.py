"""What clients may store in a hosted set: the size of one blob, the bytes of the whole set,
the number of open upload sessions (``[hosted."<name>"]`` ``max_blob_size``, ``quota``,
``max_uploads``).

Sizes are checked while a body streams, chunk by chunk, before a byte of it is written
(and at once when ``Content-Length`` already says too much): an attacker's 1 TiB PATCH is
refused at the limit, not stored first. A refusal is a ``LimitExceeded``, so the writer
knows to keep nothing of that request (uploads.py truncates the session back; a monolithic
upload's spool file is dropped).

**The quota's accounting is a running total per process** (``Usage``): the set's stored
blobs and manifests plus its open upload sessions, read from the storage when the store
opens and again on every housekeeping round (housekeeping.py), and moved by this process's
own pushes in between. Worker processes sharing a directory each keep their own total, so
between two rounds a worker does not see what the others stored: the set may exceed its
quota by what the other workers stored within one round (a minute), never more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from mirrorrouter.config.model import HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.sizes import format_size


class LimitExceeded(RegistryError):
    """A request over a limit: nothing of its body may be kept."""


class Usage:
    """The bytes a hosted set holds, as this process knows them (see the module docstring).

    ``stored`` is what is on the storage (blobs, manifests, upload sessions); ``pending``
    what bodies streaming in this process have reserved and not yet settled.
    """

    def __init__(self, name: str, quota: int | None) -> None:
        self.name = name
        self.quota = quota
        self.stored = 0
        self.pending = 0

    @property
    def total(self) -> int:
        return self.stored + self.pending

    def check(self, more: int) -> None:
        """Refuse ``more`` bytes (403 ``DENIED`` naming the set) when they exceed the quota."""
        if self.quota is not None and self.total + more > self.quota:
            raise LimitExceeded(
                ErrorCode.DENIED,
                f"hosted set {self.name!r} is over its quota of {format_size(self.quota)} "
                f"(it holds {format_size(self.total)}; this needs {format_size(more)} more)",
                detail={"hosted": self.name, "quota": self.quota, "used": self.total},
            )

    def reserve(self, size: int) -> None:
        self.check(size)
        self.pending += size

    def settle(self, size: int, *, kept: bool) -> None:
        """``size`` reserved bytes are no longer streaming: stored (``kept``) or dropped."""
        self.pending -= size
        if kept:
            self.stored += size

    def add(self, size: int) -> None:
        self.stored += size

    def remove(self, size: int) -> None:
        self.stored = max(0, self.stored - size)

    def reset(self, stored: int) -> None:
        """What the storage holds now, counted afresh (pending reservations stay)."""
        self.stored = stored


class Meter:
    """One request body on its way into a hosted set: its bytes are checked against
    ``max_blob_size`` (counting from ``start``, the bytes the upload already holds) and
    reserved against the quota as they pass, before they are written."""

    def __init__(self, settings: HostedSettings, usage: Usage, start: int = 0) -> None:
        self.settings = settings
        self.usage = usage
        self.start = start
        self.reserved = 0

    def declare(self, length: int | None) -> None:
        """Refuse a body whose ``Content-Length`` is already too much, before reading it."""
        if length is not None:
            self._check_size(length)
            self.usage.check(length)

    async def wrap(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            self._check_size(self.reserved + len(chunk))
            self.usage.reserve(len(chunk))
            self.reserved += len(chunk)
            yield chunk

    def settle(self, *, kept: bool) -> None:
        """The body is over: what passed is stored (``kept``), or was dropped."""
        self.usage.settle(self.reserved, kept=kept)
        self.reserved = 0

    def _check_size(self, length: int) -> None:
        limit = self.settings.max_blob_size
        if limit is not None and self.start + length > limit:
            raise LimitExceeded(
                ErrorCode.SIZE_INVALID,
                f"blobs of hosted set {self.settings.name!r} are limited to "
                f"{format_size(limit)} ({limit} bytes); this one would hold more",
                status=413,
                detail={"max_blob_size": limit},
            )


def too_many_uploads(settings: HostedSettings, open_sessions: int, retry_after: float) -> None:
    """Refuse a new upload session (429 ``TOOMANYREQUESTS``) when ``max_uploads`` are open."""
    if open_sessions >= settings.max_uploads:
        raise RegistryError(
            ErrorCode.TOOMANYREQUESTS,
            f"hosted set {settings.name!r} has {open_sessions} open upload sessions, its "
            f"limit (max_uploads); finish or cancel some, or wait until abandoned ones "
            f"are swept",
            headers={"Retry-After": str(max(1, round(retry_after)))},
        )
