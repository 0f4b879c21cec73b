"""One request as every handler past the door sees it: ``parse_scope``, the one parse of an
ASGI request into an ``OciRequest``, and ``Call``, the request once routed and admitted."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.types import Scope

from mirrorrouter.access.clientauth import Identity
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Resolution
from mirrorrouter.oci import OciRequest, parse_request


@dataclass(frozen=True, slots=True)
class Call:
    """One admitted request: what was asked, where it goes, who asks, from where."""

    oci: OciRequest
    resolution: Resolution
    identity: Identity | None
    client: str
    scope: Scope | None = None


def parse_scope(scope: Scope) -> OciRequest:
    """The one parse of an ASGI request into an ``OciRequest`` (both the fast path and the
    Starlette handlers use it)."""
    host: str | None = None
    range_header = ""
    accept: list[str] = []
    for name, value in scope["headers"]:
        if name == b"host":
            if host is not None:  # RFC 9110 7.2: a request with two is answered 400
                raise RegistryError(ErrorCode.NAME_INVALID, "more than one Host header")
            host = value.decode("latin-1")
        elif name == b"accept":
            accept.append(value.decode("latin-1"))
        elif name == b"range":
            range_header = value.decode("latin-1")
    query = scope.get("query_string", b"")
    return parse_request(
        scope["method"],
        scope["path"],
        query=parse_qsl(query.decode("latin-1"), keep_blank_values=True) if query else (),
        host=host or "",
        range_header=range_header or None,
        accept=accept,
    )


def client_ip(scope: Scope) -> str:
    """The client's IP address (failed logins back off by it); "" when the server has none."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def client_address(scope: Scope) -> str:
    """``ip:port`` of the client ("" when the server does not say)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
