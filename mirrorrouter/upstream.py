"""``UpstreamClient``: talks to one upstream registry through its ordered mirror list.

One client per upstream, each with its own ``httpx.AsyncClient``: its own credentials
(``auth.RegistryAuth``), timeouts and proxy. Every call goes through ``_over_mirrors``,
the one place that decides failover:

- mirrors are tried in their configured order; a mirror whose circuit is open
  (``breaker.py``; shared by every replica with Redis coordination) is skipped;
- each mirror is retried per the retry policy (``retry.py``) while its failures are
  temporary, then the next mirror is tried;
- a mirror that sends no response headers within ``first_byte_timeout`` is given up at
  once for the next (never retried: a hung mirror would cost the timeout again);
- while a mirror is slower than it usually is, the next one is asked as well (a hedge,
  ``hedging.py``); the first good answer wins, the other request is closed unread;
- when every mirror's circuit is open and none was asked, one request at a time probes the
  mirror whose cooldown ends first, instead of every request failing untried;
- every answer is kept in ``Attempts`` (in list order), which becomes the client's error
  when all failed.

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

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
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
)
from mirrorrouter.auth import RegistryAuth
from mirrorrouter.bodies import BodyRefused, drain, raw_chunks, read_capped
from mirrorrouter.breaker import CircuitBreaker, CircuitState
from mirrorrouter.config import Capability, Mirror, UpstreamSettings
from mirrorrouter.errors import ErrorCode, NoHeadersInTime, RegistryError, UpstreamError
from mirrorrouter.hedging import Entrant, HeaderLatency, Race
from mirrorrouter.manifests import MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, media_type_of
from mirrorrouter.metrics import Metrics
from mirrorrouter.reference import Digest, ImageReference
from mirrorrouter.retry import RetryPolicy
from mirrorrouter.sending import RedirectRefused, Redirects, Sender, from_elsewhere
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


@dataclass(frozen=True, slots=True)
class ListAnswer:
    """A tag list page or a referrers index: JSON, read within ``max_list_bytes``, checked
    to be the object it should be; the client gets these bytes."""

    data: bytes
    headers: httpx.Headers


@dataclass(slots=True)
class BlobStream:
    """An open upstream blob response; ``chunks()`` yields about 1 MiB at a time.

    A failure mid-body raises a temporary ``UpstreamError`` and counts against the mirror.
    Bytes are taken as sent (``aiter_raw``): a digest is over the stored bytes, and a
    Content-Encoding is never decoded (it could inflate without bound).
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
            async for chunk in raw_chunks(self.response):
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
        """The first good answer, in failover order; raises the summed-up error.

        One mirror is asked at a time, the next when it failed; while the one asked has not
        answered within its usual time, the next is asked as well (``hedge``), so at most
        two are asked at once. A hedge target must be allowed by its breaker like any other.
        """
        policy = self.settings.policy
        answers = _Answers(self.name)
        queue = deque(self._in_order(self.mirrors(capability)))
        circuit_open: list[_Asked] = []
        deadline = self.retry.start()
        asked_any = False
        async with Race[_Asked, T](self.timing.timer, _close_answer) as race:
            while True:
                pending = race.pending
                if not pending:
                    asked = await self._next_mirror(queue, exclude, answers, circuit_open)
                    if asked is None and not asked_any:
                        asked = self._early_probe(circuit_open)
                    if asked is None:
                        break
                    self._ask(race, asked, attempt, deadline, hedge=False)
                    asked_any = True
                    continue
                hedge_in = None
                if policy.hedge and len(pending) == 1 and queue:
                    lone = pending[0]
                    delay = self.latency[lone.key.mirror.url].hedge_delay(policy.first_byte_timeout)
                    hedge_in = max(0.0, lone.started + delay - self.clock())
                ended = await race.ended(hedge_in)
                if not ended:  # the one asked is slower than usual: ask the next one too
                    asked = await self._next_mirror(queue, exclude, answers, circuit_open)
                    if asked is not None:
                        self.metrics.hedges.labels(self.name, asked.mirror.name).inc()
                        self._ask(race, asked, attempt, deadline, hedge=True)
                    continue
                for entrant in ended:
                    if self._judge(entrant, what, answers):
                        self._overtaken(race.pending, entrant, what)
                        return race.take(entrant), entrant.key.mirror
        raise answers.error(not_found, what)

    def _in_order(self, mirrors: list[Mirror]) -> list[tuple[int, Mirror]]:
        """The mirrors with their places in the configured (failover) order, demoted ones
        after the others (each group keeps its configured order)."""
        now = self.clock()
        for url, until in list(self.demoted.items()):
            if until <= now:
                del self.demoted[url]
        return sorted(enumerate(mirrors), key=lambda placed: placed[1].url in self.demoted)

    async def _next_mirror(
        self,
        queue: deque[tuple[int, Mirror]],
        exclude: frozenset[str],
        answers: _Answers,
        circuit_open: list[_Asked],
    ) -> _Asked | None:
        """The next mirror in failover order that may be asked now (a half-open circuit's
        probe is claimed here); the ones passed over are noted."""
        while queue:
            position, mirror = queue.popleft()
            if mirror.name in exclude:
                answers.note(position, mirror, "skipped: served content that failed verification")
                continue
            breaker = self.breakers[mirror.url]
            await breaker.refresh()  # what other replicas saw (shared circuits only)
            if not breaker.allow():
                answers.note(position, mirror, "skipped: circuit open")
                circuit_open.append(_Asked(position, mirror, probe=True))
                continue
            return _Asked(position, mirror, probe=breaker.state is CircuitState.HALF_OPEN)
        return None

    def _early_probe(self, circuit_open: list[_Asked]) -> _Asked | None:
        """Every mirror the request could use has its circuit open: probe the one whose
        cooldown ends first now, unless a probe is out already (then fail at once, as before:
        a probe of a hung mirror takes the first-byte timeout, and the tags among the
        refused requests are served stale meanwhile)."""
        if not circuit_open:
            return None
        soonest = min(circuit_open, key=lambda a: self.breakers[a.mirror.url].reopens_in())
        if not self.breakers[soonest.mirror.url].probe_early():
            return None
        log.warning(
            "every mirror of %s has its circuit open: probing %s", self.name, soonest.mirror.name
        )
        return soonest

    def _ask(
        self,
        race: Race[_Asked, T],
        asked: _Asked,
        attempt: Callable[[Mirror], Awaitable[T]],
        deadline: float,
        *,
        hedge: bool,
    ) -> None:
        race.start(asked, self._tries(asked, attempt, deadline), started=self.clock(), hedge=hedge)

    async def _tries(
        self, asked: _Asked, attempt: Callable[[Mirror], Awaitable[T]], deadline: float
    ) -> T:
        """Every try of one mirror (the retry policy's)."""
        mirror = asked.mirror
        try:
            return await self.retry.call(
                _bind(attempt, mirror),
                deadline,
                on_retry=self.metrics.retries.labels(self.name, mirror.name).inc,
            )
        except asyncio.CancelledError:
            # Abandoned (another mirror answered first, or the client went away): a probe
            # is given back, or the circuit would stay half-open with a probe out forever.
            if asked.probe:
                self.breakers[mirror.url].release()
            raise

    def _judge(self, entrant: Entrant[_Asked, T], what: str, answers: _Answers) -> bool:
        """Count a mirror's answer (breaker, metrics, the error detail); True when good."""
        asked, outcome = entrant.key, entrant.outcome
        assert outcome is not None
        mirror, breaker = asked.mirror, self.breakers[asked.mirror.url]
        seconds = self.clock() - entrant.started
        if outcome.ok:
            self.metrics.mirror_answer(self.name, mirror.name, "ok", seconds)
            breaker.success()
            self.demoted.pop(mirror.url, None)  # it answered first: fast again
            if entrant.hedge:
                self.metrics.hedge_wins.labels(self.name, mirror.name).inc()
            return True
        exc = outcome.error
        if not isinstance(exc, UpstreamError):
            assert exc is not None
            raise exc  # not an answer of the mirror's: a fault of ours, raised as it is
        outcome_label = "not_found" if exc.is_not_found else "failure"
        self.metrics.mirror_answer(self.name, mirror.name, outcome_label, seconds)
        if exc.is_not_found:
            breaker.success()  # a healthy answer
        else:
            breaker.failure()
            self.metrics.failovers.labels(self.name, mirror.name).inc()
            log.warning("mirror %s failed %s: %s", mirror.name, what, exc.outcome)
        answers.note(asked.position, mirror, exc.outcome, exc.status, exc.retry_after)
        return False

    def _overtaken(
        self, losers: list[Entrant[_Asked, T]], winner: Entrant[_Asked, T], what: str
    ) -> None:
        """The mirrors still silent when another's answer won (they are closed next): past
        their own usual time, that is a failure for their breaker, as a timeout would have
        been, so a hung or drowning mirror's circuit opens and requests stop waiting for it;
        a hedge target asked moments ago gets no verdict. Such a mirror is also demoted for
        a ``breaker_cooldown``: asked after the others, it is only their hedge meanwhile."""
        policy = self.settings.policy
        for loser in losers:
            mirror = loser.key.mirror
            waited = self.clock() - loser.started
            if waited < self.latency[mirror.url].hedge_delay(policy.first_byte_timeout):
                continue
            self.breakers[mirror.url].failure()
            if mirror.url not in self.demoted:
                self.metrics.demotions.labels(self.name, mirror.name).inc()
            self.demoted[mirror.url] = self.clock() + policy.breaker_cooldown
            log.warning(
                "mirror %s gave no answer to %s in %.2fs; %s answered first",
                mirror.name,
                what,
                waited,
                winner.key.mirror.name,
            )

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
        fetched, _ = await self._over_mirrors(
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
            # Always from the registry, also to resume: a redirect target's URL may have
            # expired meanwhile, and the registry hands out a fresh one.
            url = self.url(mirror, repository, f"blobs/{digest}")
            response = await self._send(
                mirror, "GET", url, redirects=Redirects.ANYWHERE, headers=headers
            )
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
            await self._over_mirrors(
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

        answer, _ = await self._over_mirrors(
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

        answer, _ = await self._over_mirrors(
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


# ---------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class _Asked:
    """A mirror asked within one request: its place in the list, and whether the request
    holds its circuit's probe (to give back when the run is abandoned)."""

    position: int
    mirror: Mirror
    probe: bool


class _Answers:
    """What each mirror answered, in list order whatever order the answers came in (two
    mirrors may be asked at once); becomes the client's error (``Attempts``) when all failed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._by_position: dict[int, tuple[Mirror, str, int | None, float | None]] = {}

    def note(
        self,
        position: int,
        mirror: Mirror,
        outcome: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        # A later note replaces an earlier one: a probe's answer replaces "circuit open".
        self._by_position[position] = (mirror, outcome, status, retry_after)

    def error(self, not_found: ErrorCode, what: str) -> RegistryError:
        attempts = Attempts(self.upstream)
        for position in sorted(self._by_position):
            mirror, outcome, status, retry_after = self._by_position[position]
            attempts.add(mirror, outcome, status)
            if retry_after is not None:
                attempts.retry_after = retry_after
        return attempts.error(not_found, what)


async def _close_answer(answer: object) -> None:
    """An answer nobody took (a hedge's loser): an open response is closed unread."""
    if isinstance(answer, httpx.Response):
        await answer.aclose()


def _tried(error: RegistryError, *, leave_out: frozenset[str]) -> list[dict[str, str]]:
    """What each mirror answered, from an error of ``_over_mirrors``, but for ``leave_out``."""
    tried = error.detail.get("tried", []) if isinstance(error.detail, dict) else []
    return [t for t in tried if t.get("mirror") not in leave_out]


def _bind(attempt: Callable[[Mirror], Awaitable[T]], mirror: Mirror) -> Callable[[], Awaitable[T]]:
    # A coroutine function, not a lambda: tenacity awaits only what it sees as async.
    async def bound() -> T:
        return await attempt(mirror)

    return bound
