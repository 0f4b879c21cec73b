"""Sending one request to a mirror: credentials for the mirror's own origin only, redirects
followed outside the auth flow, a bound on hops.

::

    request  -> the mirror's origin, through the registry auth flow (auth.RegistryAuth):
                401 + challenge -> a token from the realm it names -> the request again
    3xx      -> Location resolved against the URL that answered; at most MAX_HOPS hops
                to the mirror's origin:   through the auth flow again
                to another origin (CDN):  no Authorization, no cookies, no auth flow, and
                                          only where the policy allows it (``Redirects``)
    answer   -> returned streaming; the caller reads it (bounded, bodies.py) and closes it

Why not httpx's own redirects and auth: with ``follow_redirects=True`` and ``auth=``, a
redirect target's 401 reaches the auth flow, which answers the CDN's own ``Bearer realm=``
or ``Basic`` challenge with the upstream's credentials (the OAuth2 form would carry the
password). And httpx reads every intermediate answer of an auth flow whole
(``response.aread()``): a 401 with a 600 MB body would sit in memory. Here the same
generator (``httpx.Auth.async_auth_flow``) is driven by ``Sender._through_auth``, which
reads those answers within ``bodies.ERROR_BODY_LIMIT``.

A redirect target's answer is its own: a 401 or 403 there is that target's failure
(answers.py: temporary, "ask the registry again"), never a challenge to answer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import httpx

from mirrorrouter.upstream.bodies import drain

MAX_HOPS = 5  # Docker Hub, ghcr.io, quay.io and registry.k8s.io need one
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


class Redirects(enum.Enum):
    """Where redirects of a request may lead."""

    # Only within the mirror's origin: answers the client gets without a digest to check
    # them against (tag lists, referrers, manifests by tag). Anywhere else a redirect
    # could hand the client the body of any address the gateway can reach.
    ORIGIN = "origin"
    # To any http(s) origin, without credentials: content verified by its digest (blobs
    # and manifests by digest), which registries serve from CDNs and buckets.
    ANYWHERE = "anywhere"


class RedirectRefused(Exception):
    """A redirect this request may not follow (another origin, a loop, not http)."""


def origin(url: httpx.URL) -> Origin:
    """Scheme, host and port: what credentials are bound to."""
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def from_elsewhere(response: httpx.Response, base: str) -> bool:
    """Whether ``response`` came from another origin than ``base`` (a redirect target)."""
    return origin(response.url) != origin(httpx.URL(base))


def shown(url: httpx.URL) -> str:
    """An origin for messages (never the signed query of a CDN URL)."""
    return f"{url.scheme}://{url.netloc.decode()}"


class Sender:
    """Sends requests with one upstream's HTTP client and auth flow."""

    def __init__(self, http: httpx.AsyncClient, auth: httpx.Auth) -> None:
        self.http = http  # without auth and without redirects of its own
        self.auth = auth

    async def send(
        self,
        method: str,
        url: str,
        *,
        redirects: Redirects,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """The answer to ``method url`` after redirects, streaming (the caller closes it).

        Raises httpx's errors, and ``RedirectRefused``.
        """
        request = self.http.build_request(method, url, headers=headers, params=params)
        home = origin(request.url)
        response = await self._through_auth(request)
        hops = 0
        while response.status_code in REDIRECT_STATUSES and "location" in response.headers:
            await drain(response)
            target = self._location(response, home, redirects)
            hops += 1
            if hops > MAX_HOPS:
                raise RedirectRefused(
                    f"more than {MAX_HOPS} redirects, the last to {shown(target)}"
                )
            # Only the caller's headers (Range, Accept) travel: never Authorization.
            hop = self.http.build_request(method, target, headers=headers)
            if origin(target) == home:
                response = await self._through_auth(hop)
            else:
                response = await self._plain(hop)
        return response

    @staticmethod
    def _location(response: httpx.Response, home: Origin, redirects: Redirects) -> httpx.URL:
        try:
            target = response.url.join(response.headers["location"])  # may be relative
        except httpx.InvalidURL as exc:
            raise RedirectRefused(f"redirect to an invalid URL: {exc}") from exc
        if target.scheme not in _DEFAULT_PORTS or not target.host:
            raise RedirectRefused(f"redirect to a {target.scheme or 'relative'}: URL refused")
        if redirects is Redirects.ORIGIN and origin(target) != home:
            raise RedirectRefused(
                f"redirect to {shown(target)} refused: this answer is taken only from the "
                f"mirror's own origin"
            )
        return target

    async def _through_auth(self, request: httpx.Request) -> httpx.Response:
        """One request to the mirror's origin with the auth flow: what httpx's
        ``_send_handling_auth`` does, without reading intermediate answers whole."""
        flow = self.auth.async_auth_flow(request)
        try:
            request = await flow.__anext__()
            while True:
                response = await self._plain(request)
                try:
                    following = await flow.asend(response)
                except StopAsyncIteration:
                    return response
                except BaseException:
                    await response.aclose()
                    raise
                await drain(response)  # a challenge or a token answer: small, or dropped
                request = following
        finally:
            await flow.aclose()

    async def _plain(self, request: httpx.Request) -> httpx.Response:
        # Requests made by the auth flow (to the token realm) carry no timeouts of their
        # own; without the client's, a silent realm would hang the pull.
        request.extensions.setdefault("timeout", self.http.timeout.as_dict())
        return await self.http.send(request, stream=True)
