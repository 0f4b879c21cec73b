"""``UpstreamClient``: talks to one upstream registry through its ordered mirror list.

One client per upstream, each with its own ``httpx.AsyncClient``: its own credentials
(``auth.RegistryAuth``), timeouts and proxy. Every call is a set of attempts, one per mirror
asked, that ``failover.Failover`` runs in failover order (retries, hedges, circuit
breakers, the early probe); the client says what one attempt is.

Trust split: tags are resolved only by mirrors with the ``resolve`` capability; content by
digest (manifests and blobs) comes from mirrors with ``pull`` and is always verified.

An upstream 401 or 403 never reaches the client as such (the client would then try to log
in to the mirror): Docker Hub answers 401 for a repository that does not exist under an
anonymous token, so both count as "not found at this mirror", and the detail says why.

Requests go out through ``sending.Sender`` (credentials only for the mirror's origin,
redirects followed outside the auth flow: blobs and manifests by digest anywhere, tag
lists, referrers and manifests by tag only within the mirror's origin); every body read
whole is read within a cap (``bodies.read_capped``). A blob whose redirect target fails
is asked of the registry again (the retry policy, and fill.py's resumes, start at the
mirror), so an expired signed URL costs one more request, not the pull.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TYPE_CHECKING

import httpx

from mirrorrouter.config import Capability, Mirror, UpstreamSettings
from mirrorrouter.errors import ErrorCode, NoHeadersInTime, RegistryError, UpstreamError
from mirrorrouter.manifests import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, media_type_of
from mirrorrouter.metrics import Metrics
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.timing import REAL_TIME, Timing
from mirrorrouter.upstream.answers import (
    blob_size_from_headers,
    content_type_of,
    describe,
    failure,
    final,
    header_digest,
)
from mirrorrouter.upstream.auth import RegistryAuth
from mirrorrouter.upstream.bodies import BodyRefused, drain, read_capped
from mirrorrouter.upstream.breaker import CircuitBreaker, CircuitState
from mirrorrouter.upstream.failover import Failover
from mirrorrouter.upstream.hedging import HeaderLatency
from mirrorrouter.upstream.results import BlobStream, FetchedManifest, ListAnswer, ManifestHead
from mirrorrouter.upstream.retry import RetryPolicy
from mirrorrouter.upstream.sending import RedirectRefused, Redirects, Sender, from_elsewhere
from mirrorrouter.upstream.transport import upstream_network

if TYPE_CHECKING:
    from mirrorrouter.coordination import Coordinator

log = logging.getLogger("mirrorrouter.upstream")

_ACCEPT = ", ".join(MANIFEST_ACCEPT)


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
        self.timing = timing
        self.clock = timing.monotonic
        self.latency = {m.url: HeaderLatency() for m in settings.mirrors}  # sets hedge delays
        # Mirrors a hedge overtook while they were past their usual time, until when (the
        # monotonic clock): asked after the others meanwhile, so a slow mirror costs one
        # hedge delay per cooldown instead of one per request.
        self.demoted: dict[str, float] = {}
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
        # The aiohttp transport moves bytes twice as fast and chooses proxies (transport.py).
        network, tls = upstream_network(settings)
        self.http = httpx.AsyncClient(
            # No auth and no redirects here: sending.Sender drives both, so that credentials
            # go to the mirror's origin only and redirect targets' answers stay theirs.
            auth=None,
            follow_redirects=False,
            # No cookies either, as containerd keeps none: nothing rides along to a CDN.
            cookies=httpx.Cookies(CookieJar(DefaultCookiePolicy(allowed_domains=[]))),
            timeout=httpx.Timeout(
                connect=policy.connect_timeout,
                read=policy.read_timeout,
                write=policy.read_timeout,
                pool=policy.connect_timeout,
            ),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
            verify=tls,
            transport=transport or network,
            # identity: a compressed body could inflate past any cap (bodies.py).
            headers={"User-Agent": "mirrorrouter", "Accept-Encoding": "identity"},
        )
        self.sender = Sender(self.http, self.auth)
        self.failover = Failover(
            settings,
            breakers=self.breakers,
            latency=self.latency,
            demoted=self.demoted,
            retry=self.retry,
            metrics=self.metrics,
            timing=timing,
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
        return self.failover.mirrors(capability)

    @staticmethod
    def url(mirror: Mirror, repository: str, suffix: str) -> str:
        return f"{mirror.url}/v2/{repository}/{suffix}"

    async def _send(
        self,
        mirror: Mirror,
        method: str,
        url: str,
        *,
        redirects: Redirects,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request to a mirror, streaming: the caller reads it (bounded) and closes it.

        Its response headers (with any token exchange and redirect on the way) must arrive
        within ``first_byte_timeout``, else ``NoHeadersInTime``; the time to the headers is
        what the mirror's hedge delay is learned from."""
        limit = self.settings.policy.first_byte_timeout
        started = self.clock()
        try:
            async with self.timing.deadline(limit):
                response = await self.sender.send(
                    method, url, redirects=redirects, headers=headers, params=params
                )
        except TimeoutError as exc:
            self.latency[mirror.url].record(limit)
            self.metrics.first_byte_timeouts.labels(self.name, mirror.name).inc()
            message = f"no response headers within {limit:g}s (first_byte_timeout)"
            raise NoHeadersInTime(message, mirror=mirror.name) from exc
        except httpx.TimeoutException as exc:  # connect/read timeout before the headers: hung
            raise NoHeadersInTime(describe(exc), mirror=mirror.name) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc), mirror=mirror.name, is_temporary=True) from exc
        except RedirectRefused as exc:
            raise final(mirror, str(exc)) from exc
        self.latency[mirror.url].record(self.clock() - started)
        remaining = response.headers.get("ratelimit-remaining")  # Docker Hub's pull quota
        if remaining is not None:
            self.metrics.ratelimit_remaining(self.name, remaining)
        return response

    # ------------------------------------------------------------------ manifests

    async def fetch_manifest(self, ref: ImageReference) -> FetchedManifest:
        """GET a manifest: by tag from resolve mirrors, by digest from pull mirrors."""
        capability = Capability.PULL if ref.digest else Capability.RESOLVE
        fetched, _ = await self.failover.first(
            capability,
            f"manifest {ref}",
            ErrorCode.MANIFEST_UNKNOWN,
            lambda mirror: self._get_manifest(mirror, ref),
        )
        return fetched

    async def _get_manifest(self, mirror: Mirror, ref: ImageReference) -> FetchedManifest:
        url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
        # A manifest by digest is verified like a blob; by tag, nothing vouches for it.
        redirects = Redirects.ANYWHERE if ref.digest else Redirects.ORIGIN
        response = await self._send(
            mirror, "GET", url, redirects=redirects, headers={"Accept": _ACCEPT}
        )
        if response.status_code != 200:
            raise await failure(mirror, response)
        body = await self._read(mirror, response, MAX_MANIFEST_BYTES, "manifest")
        algorithm = ref.digest.algorithm if ref.digest else "sha256"
        digest = Digest.of(body, algorithm)
        expected = ref.digest or header_digest(response.headers)
        if expected is not None and expected.algorithm == algorithm and expected != digest:
            log.warning(
                "mirror %s served a manifest for %s that hashes to %s", mirror.name, ref, digest
            )
            raise final(mirror, f"content hashed to {digest}, not {expected}: corrupt")
        media_type = media_type_of(response.headers.get("content-type"), body)
        if media_type is None:
            raise final(mirror, "answer is not a manifest")
        return FetchedManifest(digest, media_type, body, mirror.name)

    async def head_manifest(self, ref: ImageReference) -> ManifestHead:
        """HEAD a tag on the resolve mirrors (Docker Hub does not count HEADs against quota)."""

        async def attempt(mirror: Mirror) -> ManifestHead:
            url = self.url(mirror, ref.repository, f"manifests/{ref.reference}")
            response = await self._send(
                mirror, "HEAD", url, redirects=Redirects.ORIGIN, headers={"Accept": _ACCEPT}
            )
            if response.status_code != 200:
                raise await failure(mirror, response)
            await response.aclose()
            media_type = content_type_of(response.headers.get("content-type")) or ""
            return ManifestHead(header_digest(response.headers), media_type, mirror.name)

        head, _ = await self.failover.first(
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
            # Always from the registry, also to resume: a redirect target's URL may have
            # expired meanwhile, and the registry hands out a fresh one.
            url = self.url(mirror, repository, f"blobs/{digest}")
            response = await self._send(
                mirror, "GET", url, redirects=Redirects.ANYWHERE, headers=headers
            )
            if response.status_code == 200 or (offset and response.status_code == 206):
                return response
            raise await failure(mirror, response)

        response, mirror = await self.failover.round_from(
            after, f"blob {digest}", ErrorCode.BLOB_UNKNOWN, attempt, exclude=exclude
        )
        try:
            # An upstream that ignores Range sends the whole blob: drop what we have.
            skip = offset if offset and response.status_code == 200 else 0
            size = blob_size_from_headers(response, offset if response.status_code == 206 else 0)
            yield BlobStream(response, size, offset, mirror.name, self.breakers[mirror.url], skip)
        finally:
            await response.aclose()

    async def blob_exists(self, repository: str, digest: Digest) -> bool:
        """Whether a pull mirror confirms the blob in this repository."""

        async def attempt(mirror: Mirror) -> bool:
            url = self.url(mirror, repository, f"blobs/{digest}")
            response = await self._send(mirror, "HEAD", url, redirects=Redirects.ANYWHERE)
            if response.status_code == 404 or from_elsewhere(response, mirror.url):
                # An upstream that is itself a proxy may 404 a HEAD until a GET fetched the
                # blob, and a URL a registry signed for GET may refuse a HEAD: probe with a
                # one-byte GET.
                await drain(response)
                response = await self._send(
                    mirror, "GET", url, redirects=Redirects.ANYWHERE, headers={"Range": "bytes=0-0"}
                )
            if response.status_code in (200, 206):
                await response.aclose()  # never read: an upstream ignoring Range sends it all
                return True
            raise await failure(mirror, response)

        try:
            await self.failover.first(
                Capability.PULL, f"blob {digest}", ErrorCode.BLOB_UNKNOWN, attempt
            )
        except RegistryError:
            return False
        return True

    # ------------------------------------------------------------------ tags, referrers

    async def get_tags(self, repository: str, query: Mapping[str, str]) -> ListAnswer:
        """The tag list page from the first resolve mirror that answers 200."""

        async def attempt(mirror: Mirror) -> ListAnswer:
            url = self.url(mirror, repository, "tags/list")
            response = await self._send(
                mirror, "GET", url, redirects=Redirects.ORIGIN, params=query
            )
            if response.status_code != 200:
                raise await failure(mirror, response)
            return await self._list(mirror, response, "tag list", "tags")

        answer, _ = await self.failover.first(
            Capability.RESOLVE, f"repository {repository}", ErrorCode.NAME_UNKNOWN, attempt
        )
        return answer

    async def get_referrers(
        self, repository: str, digest: Digest, artifact_type: str | None
    ) -> ListAnswer | None:
        """The upstream's referrers index; None when the mirror has no referrers API."""
        params = {"artifactType": artifact_type} if artifact_type else {}

        async def attempt(mirror: Mirror) -> ListAnswer | None:
            url = self.url(mirror, repository, f"referrers/{digest}")
            response = await self._send(
                mirror, "GET", url, redirects=Redirects.ORIGIN, params=params
            )
            if response.status_code == 200:
                return await self._list(mirror, response, "referrers index", "manifests")
            if response.status_code in (404, 405, 501):
                await response.aclose()
                return None  # no referrers API here: the tag schema is the fallback
            raise await failure(mirror, response)

        answer, _ = await self.failover.first(
            Capability.RESOLVE, f"referrers of {digest}", ErrorCode.NAME_UNKNOWN, attempt
        )
        return answer

    # ------------------------------------------------------------------ bounded reads

    async def _read(self, mirror: Mirror, response: httpx.Response, limit: int, what: str) -> bytes:
        """A whole body within ``limit``; too large or compressed is this mirror's final
        failure (not the client's 500), a broken connection a temporary one."""
        try:
            return await read_capped(response, limit)
        except BodyRefused as exc:
            raise final(mirror, f"{what} {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(describe(exc), mirror=mirror.name, is_temporary=True) from exc
        finally:
            await response.aclose()

    async def _list(
        self, mirror: Mirror, response: httpx.Response, what: str, key: str
    ) -> ListAnswer:
        """A tag list or referrers index: only JSON, only within ``max_list_bytes``, only
        an object whose ``key`` is a list (tags may be null for an empty repository)."""
        declared = content_type_of(response.headers.get("content-type"))
        if declared is not None and not _is_json(declared):
            await response.aclose()
            raise final(mirror, f"{what} answered as {declared}, not JSON")
        limit = self.settings.policy.max_list_bytes
        data = await self._read(mirror, response, limit, f"{what} (max_list_bytes)")
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        entries = document.get(key) if isinstance(document, dict) else ()
        if not isinstance(entries, list) and not (key == "tags" and entries is None):
            raise final(mirror, f"{what} is not a JSON object with a {key!r} list")
        return ListAnswer(data, response.headers)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")
