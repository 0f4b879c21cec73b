"""OCI distribution HTTP constants and ``OciRequest``, the one parse of an incoming request.

The path is parsed exactly once, here; everything past the endpoint speaks in typed values.
``<name>`` holds slashes, so it is split at the LAST ``/manifests/``, ``/blobs/``,
``/tags/`` or ``/referrers/``.

A request may carry a route prefix before ``/v2`` (containerd appends ``/v2`` to a host URL
that has a path: ``http://mirror:5000/gcr`` -> ``/gcr/v2/...``); that prefix is kept apart
in ``OciRequest.prefix`` for the mapper.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlencode

from mirrorrouter.errors import ErrorCode, RegistryError, reference_error
from mirrorrouter.headers import parse_host
from mirrorrouter.reference import PATH_COMPONENT_RE, Digest, InvalidReference, validate_tag

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
CONTENT_DIGEST_HEADER = "Docker-Content-Digest"
NAMESPACE_HEADER = "OCI-Namespace"
FILTERS_APPLIED_HEADER = "OCI-Filters-Applied"
# The gateway's own answer headers: how the content was served, and by which target.
CACHE_HEADER = "X-Cache"
UPSTREAM_HEADER = "X-Upstream"


class CacheResult(enum.StrEnum):
    """How a pull was served: the ``X-Cache`` value, the cache-result label of the metrics,
    the audit log's and the status page's word for it."""

    HIT = "HIT"  # from the cache
    MISS = "MISS"  # fetched upstream (and cached)
    STALE = "STALE"  # the last known answer, served because every mirror failed
    HOSTED = "HOSTED"  # hosted content: not a cache, the only copy


class RequestKind(enum.Enum):
    """Which endpoint of the distribution API a request addresses."""

    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    UPLOAD = "upload"


_PUSH_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class OciRequest:
    """An incoming distribution API request, parsed once at the door."""

    method: str
    kind: RequestKind
    name: str = ""  # the repository path as the client wrote it (may include a route prefix)
    tag: str | None = None
    digest: Digest | None = None
    upload_id: str | None = None  # the session id in /blobs/uploads/<id>
    prefix: str = ""  # a route prefix written before /v2 ("gcr" in /gcr/v2/...)
    ns: str | None = None  # containerd's ?ns=<registry as written in the image name>
    host: str = ""  # the Host header (validated), lower case, without the port
    range: str | None = None
    accept: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()

    @property
    def is_write(self) -> bool:
        """A push: any upload request (its status GET too), a PUT, PATCH, POST or DELETE."""
        return self.kind is RequestKind.UPLOAD or self.method in _PUSH_METHODS

    @property
    def reference(self) -> str:
        """The tag or digest after /manifests/ as written."""
        return str(self.digest) if self.digest is not None else (self.tag or "")

    def client_url(self, path: str, query: dict[str, str] | None = None) -> str:
        """A URL on this mirror as the client addressed it (same route prefix, same name,
        same ``ns``), for ``Location`` and ``Link`` headers it must follow back."""
        query = dict(query or {})
        if self.ns:
            query["ns"] = self.ns
        prefix = f"/{self.prefix}" if self.prefix else ""
        url = f"{prefix}/v2/{self.name}/{path}"
        return f"{url}?{urlencode(query)}" if query else url

    def query_value(self, key: str) -> str | None:
        for k, v in self.query:
            if k == key:
                return v
        return None


_SUFFIXES: tuple[tuple[str, RequestKind], ...] = (
    ("/manifests/", RequestKind.MANIFEST),
    ("/blobs/uploads", RequestKind.UPLOAD),
    ("/blobs/", RequestKind.BLOB),
    ("/tags/", RequestKind.TAGS),
    ("/referrers/", RequestKind.REFERRERS),
)


def parse_request(
    method: str,
    path: str,
    *,
    query: Iterable[tuple[str, str]] = (),
    host: str = "",
    range_header: str | None = None,
    accept: Iterable[str] = (),
) -> OciRequest:
    """Turn a raw method, path, query and headers into an ``OciRequest``.

    Raises ``RegistryError`` for a path that is not a distribution API path.
    """
    query = tuple(query)
    prefix, api_path = _split_prefix(path)
    kind, name, rest = _endpoint(api_path, path)
    tag = digest = upload_id = None
    if kind is RequestKind.UPLOAD:
        upload_id = rest.strip("/") or None
    elif kind is RequestKind.MANIFEST and ":" not in rest:
        tag = _parse_tag(rest, method)
    elif kind in (RequestKind.MANIFEST, RequestKind.BLOB, RequestKind.REFERRERS):
        digest = _parse_digest(rest, kind, method)
    return OciRequest(
        method=method,
        kind=kind,
        name=name,
        tag=tag,
        digest=digest,
        upload_id=upload_id,
        prefix=prefix,
        ns=next((v for k, v in query if k == "ns"), None) or None,
        host=_host_without_port(host),
        range=range_header,
        # Clients send several Accept lines (podman, skopeo) or one comma list (containerd).
        accept=tuple(
            part.split(";", 1)[0].strip()
            for line in accept
            for part in line.split(",")
            if part.strip()
        ),
        query=query,
    )


def _endpoint(api_path: str, path: str) -> tuple[RequestKind, str, str]:
    """Which endpoint ``/<name>/<keyword>/<rest>`` addresses: (kind, name, rest)."""
    if api_path in ("", "/"):
        return RequestKind.BASE, "", ""
    for suffix, kind in _SUFFIXES:
        index = api_path.rfind(suffix)
        if index <= 0:
            continue
        name, rest = api_path[1:index], api_path[index + len(suffix) :]
        _check_name(name)
        if kind is RequestKind.TAGS and rest != "list":
            break
        return kind, name, rest
    raise RegistryError(ErrorCode.NOT_FOUND, f"no distribution API endpoint at {path}")


def _split_prefix(path: str) -> tuple[str, str]:
    """Split ``/<prefix>/v2/<rest>`` into ``("<prefix>", "/<rest>")``; no prefix for /v2/."""
    if path == "/v2" or path.startswith("/v2/"):
        return "", path[3:]
    if path.endswith("/v2"):
        head, tail = path[:-3], ""
    else:
        head, sep, rest = path.partition("/v2/")
        if not sep:
            raise RegistryError(ErrorCode.NOT_FOUND, f"no distribution API endpoint at {path}")
        tail = "/" + rest
    prefix = head.strip("/")
    if not prefix or not all(PATH_COMPONENT_RE.fullmatch(p) for p in prefix.split("/")):
        raise RegistryError(ErrorCode.NOT_FOUND, f"no distribution API endpoint at {path}")
    return prefix, tail


def _host_without_port(value: str) -> str:
    """The host of a Host header (none: ""); a header that is not ``host[:port]`` is refused
    here, at the door, since the mapper routes on it and challenges name it."""
    if not value:
        return ""
    try:
        return parse_host(value).host
    except ValueError as exc:
        shown = value if len(value) <= 100 else value[:100] + "..."
        raise RegistryError(
            ErrorCode.NAME_INVALID, f"invalid Host header {shown!r}: {exc}; expected host[:port]"
        ) from None


def _check_name(name: str) -> None:
    # Only the shape is checked here; the mapper validates the name against its registry.
    if not name or name.startswith("/") or name.endswith("/") or "//" in name:
        raise RegistryError(ErrorCode.NAME_INVALID, f"invalid repository name {name!r}")


# A pull of a reference that cannot exist asks for something there is not: 404, as the
# distribution-spec conformance suite expects (GET/HEAD .../manifests/.INVALID_MANIFEST_NAME).
# A push or delete naming one is a bad request: 400 with the code the spec gives it.
_PULL_METHODS = frozenset({"GET", "HEAD"})
_NOT_THERE = {
    RequestKind.MANIFEST: ErrorCode.MANIFEST_UNKNOWN,
    RequestKind.BLOB: ErrorCode.BLOB_UNKNOWN,
    RequestKind.REFERRERS: ErrorCode.MANIFEST_UNKNOWN,  # the subject manifest
}
_CANNOT_EXIST = ": no such reference can exist"


def _invalid_reference(
    kind: RequestKind, method: str, bad_request: ErrorCode, exc: InvalidReference
) -> RegistryError:
    if method in _PULL_METHODS:
        return reference_error(_NOT_THERE[kind], exc, why=_CANNOT_EXIST)
    return reference_error(bad_request, exc)


def _parse_digest(text: str, kind: RequestKind, method: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidReference as exc:
        raise _invalid_reference(kind, method, ErrorCode.DIGEST_INVALID, exc) from exc


def _parse_tag(text: str, method: str) -> str:
    try:
        return validate_tag(text)
    except InvalidReference as exc:
        # The spec has no TAG_INVALID: a manifest PUT to a bad tag is MANIFEST_INVALID.
        raise _invalid_reference(
            RequestKind.MANIFEST, method, ErrorCode.MANIFEST_INVALID, exc
        ) from exc
