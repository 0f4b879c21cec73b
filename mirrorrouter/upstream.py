"""``UpstreamClient``: talks to one upstream registry through its ordered mirror list.

One client per upstream, each with its own ``httpx.AsyncClient``: its own credentials
(``auth.RegistryAuth``), timeouts and proxy. Every call goes through ``_over_mirrors``,
the one place that decides failover:

- mirrors are tried in their configured order; a mirror whose circuit is open
  (``breaker.py``; shared by every replica with Redis coordination) is skipped;
- each mirror is retried per the retry policy (``retry.py``) while its failures are
  temporary, then the next mirror is tried;
- every answer is kept in ``Attempts``, which becomes the client's error when all failed.

Trust split: tags are resolved only by mirrors with the ``resolve`` capability; content by
digest (manifests and blobs) comes from mirrors with ``pull`` and is always verified.

An upstream 401 or 403 never reaches the client as such (the client would then try to log
in to the mirror): Docker Hub answers 401 for a repository that does not exist under an
anonymous token, so both count as "not found at this mirror", and the detail says why.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import httpx

from mirrorrouter.answers import (
    Attempts,
    blob_size_from_headers,
    content_type_of,
    describe,
    failure,
    final,
    header_digest,
    manifest_media_type,
)
from mirrorrouter.auth import RegistryAuth
from mirrorrouter.breaker import CircuitBreaker, CircuitState
from mirrorrouter.config import Capability, Mirror, UpstreamSettings
from mirrorrouter.errors import ErrorCode, RegistryError, UpstreamError
from mirrorrouter.metrics import Metrics
from mirrorrouter.oci import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
)
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.retry import RetryPolicy
from mirrorrouter.timing import REAL_TIME, Timing
from mirrorrouter.transport import upstream_network

if TYPE_CHECKING:
    from mirrorrouter.coordination import Coordinator

log = logging.getLogger("mirrorrouter.upstream")

T = TypeVar("T")
BLOB_CHUNK = 1024 * 1024
_ACCEPT = ", ".join(MANIFEST_ACCEPT)


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    digest: Digest
    media_type: str
    data: bytes
    mirror: str


@dataclass(frozen=True, slots=True)
class ManifestHead:
    digest: Digest | None
    media_type: str
    mirror: str


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob response; ``chunks()`` yields about 1 MiB at a time.

    A failure mid-body raises a temporary ``UpstreamError`` and counts against the mirror.
    """

    response: httpx.Response
    size: int | None  # of the whole blob, when the upstream said
    offset: int
    mirror: str
    breaker: CircuitBreaker
    skip: int = 0  # bytes to drop: the upstream ignored Range and sent the whole blob

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces of about 1 MiB: the transport delivers ~64 KiB reads, and each
        piece costs the writer a thread hop, while one join costs a memcpy."""
        skip = self.skip
        parts: list[bytes] = []
        pending = 0
        failure: UpstreamError | None = None
        try:
            async for chunk in self.response.aiter_bytes():
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                    if not chunk:
                        continue
                parts.append(chunk)
                pending += len(chunk)
                if pending >= BLOB_CHUNK:
                    yield b"".join(parts)
                    parts, pending = [], 0
        except httpx.HTTPError as exc:
            self.breaker.failure()
            failure = UpstreamError(describe(exc), mirror=self.mirror, is_temporary=True)
            failure.__cause__ = exc
        if parts:  # also what arrived before a failure: a resume continues after it
            yield b"".join(parts)
        if failure is not None:
            raise failure


class UpstreamClient:
    """Manifests, blobs, tags and referrers from one upstream, with mirror failover."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timing: Timing = REAL_TIME,
        metrics: Metrics | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        """``coordinator`` shares the mirrors' circuit state with other replicas."""
        policy = settings.policy
        self.settings = settings
        self.name = settings.name
        self.metrics = metrics or Metrics()
        self.clock = timing.monotonic
        self.retry = RetryPolicy(
            attempts=policy.retry_attempts,
            deadline=policy.retry_deadline,
            sleep=timing.sleep,
            clock=timing.monotonic,
        )
        self.breakers = {
            m.url: CircuitBreaker(
                m.name,
                threshold=policy.breaker_failures,
                cooldown=policy.breaker_cooldown,
                clock=timing.monotonic,
                on_change=self._circuit_reporter(m),
                shared=coordinator.circuit(
                    self.name,
                    m.url,
                    threshold=policy.breaker_failures,
                    cooldown=policy.breaker_cooldown,
                )
                if coordinator is not None
                else None,
            )
            for m in settings.mirrors
        }
        self.auth = RegistryAuth(settings.credentials)
        # The aiohttp transport moves bytes twice as fast unless a proxy applies (transport.py).
        network, tls = upstream_network(settings)
        self.http = httpx.AsyncClient(
            auth=self.auth,
            timeout=httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            ),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
            proxy=policy.proxy,
            follow_redirects=True,  # CDN redirects; httpx drops Authorization across hosts
            verify=tls,
            transport=transport or network,
            headers={"User-Agent": "mirrorrouter"},
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    def _circuit_reporter(self, mirror: Mirror) -> Callable[[CircuitState], None]:
        def report(state: CircuitState) -> None:
            self.metrics.circuit_changed(self.name, mirror.name, state.value)

        return report

    def report_failure(self, mirror_name: str) -> None:
        """Count a failure found after the fact (content that failed verification)."""
        for mirror in self.settings.mirrors:
            if mirror.name == mirror_name:
                self.breakers[mirror.url].failure()

    def mirrors(self, capability: Capability) -> list[Mirror]:
        return [m for m in self.settings.mirrors if capability in m.capabilities]

    @staticmethod
    def url(mirror: Mirror, repository: str, suffix: str) -> str:
        return f"{mirror.url}/v2/{repository}/{suffix}"

    # ------------------------------------------------------------------ failover

    async def _over_mirrors(
        self,
        capability: Capability,
        what: str,
        not_found: ErrorCode,
        attempt: Callable[[Mirror], Awaitable[T]],
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> tuple[T, Mirror]:
        """The first mirror's answer, in failover order; raises the summed-up error."""
        attempts = Attempts(self.name)
        deadline = self.retry.start()
        for mirror in self.mirrors(capability):
            if mirror.name in exclude:
                attempts.add(mirror, "skipped: served content that failed verification")
                continue
            breaker = self.breakers[mirror.url]
            await breaker.refresh()  # what other replicas saw (shared circuits only)
            if not breaker.allow():
                attempts.add(mirror, "skipped: circuit open")
                continue
            started = self.clock()
            try:
                result = await self.retry.call(
                    _bind(attempt, mirror),
                    deadline,
                    on_retry=self.metrics.retries.labels(self.name, mirror.name).inc,
                )
            except UpstreamError as exc:
                outcome = "not_found" if exc.is_not_found else "failure"
                self.metrics.mirror_answer(self.name, mirror.name, outcome, self.clock() - started)
                if exc.is_not_found:
                    breaker.success()  # a healthy answer
                else:
                    breaker.failure()
                    self.metrics.failovers.labels(self.name, mirror.name).inc()
                    log.warning("mirror %s failed %s: %s", mirror.name, what, exc.outcome)
                attempts.add(mirror, exc.outcome, exc.status)
                if exc.retry_after is not None:
                    attempts.retry_after = exc.retry_after
                continue
            self.metrics.mirror_answer(self.name, mirror.name, "ok", self.clock() - started)
            breaker.success()
            return result, mirror
        raise attempts.error(not_found, what)

    async def _send(
        self,
        mirror: Mirror,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        request = self.http.build_request(method, url, headers=headers, params=params)
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc), mirror=mirror.name, is_temporary=True) from exc
        remaining = response.headers.get("ratelimit-remaining")  # Docker Hub's pull quota
        if remaining is not None:
            self.metrics.ratelimit_remaining(self.name, remaining)
        return response

    # ------------------------------------------------------------------ manifests

    async def fetch_manifest(self, ref: ImageReference) -> FetchedManifest:
        """GET a manifest: by tag from resolve mirrors, by digest from pull mirrors."""
        capability = Capability.PULL if ref.digest else Capability.RESOLVE
        fetched, _ = await self._over_mirrors(
            capability,
            f"manifest {ref}",
            ErrorCode.MANIFEST_UNKNOWN,
            lambda mirror: self._get_manifest(mirror, ref),
        )
        return fetched

    async def _get_manifest(self, mirror: Mirror, ref: ImageReference) -> FetchedManifest:
        url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
        response = await self._send(mirror, "GET", url, headers={"Accept": _ACCEPT}, stream=True)
        try:
            if response.status_code != 200:
                raise await failure(mirror, response)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_MANIFEST_BYTES:
                raise final(mirror, f"manifest of {declared} bytes is over the 4 MiB limit")
            data = bytearray()
            try:
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_MANIFEST_BYTES:
                        raise final(mirror, "manifest is over the 4 MiB limit")
            except httpx.HTTPError as exc:
                raise UpstreamError(describe(exc), mirror=mirror.name, is_temporary=True) from exc
        finally:
            await response.aclose()
        body = bytes(data)
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        digest = Digest.of(body, algorithm)
        expected = ref.digest or header_digest(response.headers)
        if expected is not None and expected.algorithm == algorithm and expected != digest:
            log.warning(
                "mirror %s served a manifest for %s that hashes to %s", mirror.name, ref, digest
            )
            raise final(mirror, f"content hashed to {digest}, not {expected}: corrupt")
        media_type = manifest_media_type(response.headers.get("content-type"), body)
        if media_type is None:
            raise final(mirror, "answer is not a manifest")
        return FetchedManifest(digest, media_type, body, mirror.name)

    async def head_manifest(self, ref: ImageReference) -> ManifestHead:
        """HEAD a tag on the resolve mirrors (Docker Hub does not count HEADs against quota)."""

        async def attempt(mirror: Mirror) -> ManifestHead:
            url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
            response = await self._send(mirror, "HEAD", url, headers={"Accept": _ACCEPT})
            if response.status_code != 200:
                raise await failure(mirror, response)
            media_type = content_type_of(response.headers.get("content-type")) or ""
            return ManifestHead(header_digest(response.headers), media_type, mirror.name)

        head, _ = await self._over_mirrors(
            Capability.RESOLVE, f"manifest {ref}", ErrorCode.MANIFEST_UNKNOWN, attempt
        )
        return head

    # ------------------------------------------------------------------ blobs

    @asynccontextmanager
    async def open_blob(
        self,
        repository: str,
        digest: Digest,
        offset: int = 0,
        *,
        exclude: frozenset[str] = frozenset(),
        after: str | None = None,
    ) -> AsyncIterator[BlobStream]:
        """Open a blob stream on the first pull mirror that has it (from ``offset``).

        ``exclude`` names mirrors not to ask (they served this blob corrupt). ``after`` names
        the mirror whose stream of this blob just broke: the mirrors after it in the failover
        order are asked first, then those before it, and it last, so a resume goes round the
        mirrors instead of back to the one that broke.
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}

        async def attempt(mirror: Mirror) -> httpx.Response:
            url = self.url(mirror, repository, f"blobs/{digest}")
            response = await self._send(mirror, "GET", url, headers=headers, stream=True)
            if response.status_code == 200 or (offset and response.status_code == 206):
                return response
            raise await failure(mirror, response)

        response, mirror = await self._round_from(
            after, f"blob {digest}", ErrorCode.BLOB_UNKNOWN, attempt, exclude=exclude
        )
        try:
            # An upstream that ignores Range sends the whole blob: drop what we have.
            skip = offset if offset and response.status_code == 200 else 0
            size = blob_size_from_headers(response, offset if response.status_code == 206 else 0)
            yield BlobStream(response, size, offset, mirror.name, self.breakers[mirror.url], skip)
        finally:
            await response.aclose()

    async def _round_from(
        self,
        after: str | None,
        what: str,
        not_found: ErrorCode,
        attempt: Callable[[Mirror], Awaitable[T]],
        *,
        exclude: frozenset[str],
    ) -> tuple[T, Mirror]:
        """``_over_mirrors`` on the pull mirrors, in failover order turned round to start
        after the mirror ``after`` (which comes last); one error listing every answer."""
        names = [m.name for m in self.mirrors(Capability.PULL)]
        turns = [names]
        if after in names:
            cut = names.index(after) + 1
            turns = [turn for turn in (names[cut:], names[:cut]) if turn]
        tried: list[dict[str, str]] = []
        for turn in turns:
            elsewhere = frozenset(names).difference(turn, exclude)  # asked in the other turn
            try:
                return await self._over_mirrors(
                    Capability.PULL, what, not_found, attempt, exclude=exclude | elsewhere
                )
            except RegistryError as error:
                # Each mirror as the turn that asked it answered; the excluded ones once.
                listed = elsewhere if turn is turns[0] else elsewhere | exclude
                tried += _tried(error, leave_out=listed)
                if turn is turns[-1]:
                    if isinstance(error.detail, dict):
                        error.detail["tried"] = tried
                    raise
        raise AssertionError("unreachable: the last turn returns or raises")

    async def blob_exists(self, repository: str, digest: Digest) -> bool:
        """Whether a pull mirror confirms the blob in this repository."""

        async def attempt(mirror: Mirror) -> bool:
            url = self.url(mirror, repository, f"blobs/{digest}")
            response = await self._send(mirror, "HEAD", url)
            if response.status_code == 404:
                # An upstream that is itself a proxy may 404 a HEAD until a GET fetched the
                # blob: probe with a one-byte GET.
                response = await self._send(mirror, "GET", url, headers={"Range": "bytes=0-0"})
            if response.status_code in (200, 206):
                return True
            raise await failure(mirror, response)

        try:
            await self._over_mirrors(
                Capability.PULL, f"blob {digest}", ErrorCode.BLOB_UNKNOWN, attempt
            )
        except RegistryError:
            return False
        return True

    # ------------------------------------------------------------------ tags, referrers

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> httpx.Response:
        """The tag list page from the first resolve mirror that answers 200 (body read)."""

        async def attempt(mirror: Mirror) -> httpx.Response:
            url = self.url(mirror, repository, "tags/list")
            response = await self._send(mirror, "GET", url, params=query)
            if response.status_code != 200:
                raise await failure(mirror, response)
            return response

        response, _ = await self._over_mirrors(
            Capability.RESOLVE, f"repository {repository}", ErrorCode.NAME_UNKNOWN, attempt
        )
        return response

    async def get_referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> httpx.Response | None:
        """The upstream's referrers answer; None when the mirror has no referrers API."""
        params = {"artifactType": artifact_type} if artifact_type else {}

        async def attempt(mirror: Mirror) -> httpx.Response | None:
            url = self.url(mirror, repository, f"referrers/{digest}")
            response = await self._send(mirror, "GET", url, params=params)
            if response.status_code == 200:
                return response
            if response.status_code in (404, 405, 501):
                return None  # no referrers API here: the tag schema is the fallback
            raise await failure(mirror, response)

        response, _ = await self._over_mirrors(
            Capability.RESOLVE, f"referrers of {digest}", ErrorCode.NAME_UNKNOWN, attempt
        )
        return response


# ---------------------------------------------------------------------- classification


def _tried(error: RegistryError, *, leave_out: frozenset[str]) -> list[dict[str, str]]:
    """What each mirror answered, from an error of ``_over_mirrors``, but for ``leave_out``."""
    tried = error.detail.get("tried", []) if isinstance(error.detail, dict) else []
    return [t for t in tried if t.get("mirror") not in leave_out]


def _bind(attempt: Callable[[Mirror], Awaitable[T]], mirror: Mirror) -> Callable[[], Awaitable[T]]:
    # A coroutine function, not a lambda: tenacity awaits only what it sees as async.
    async def bound() -> T:
        return await attempt(mirror)

    return bound
