"""Mapping: every client dialect routes to the right upstream and canonical name, closed world."""

from __future__ import annotations

import pytest

from mirrorrouter.config import Settings, parse_settings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Mapper, RouteKind
from mirrorrouter.oci import OciRequest, RequestKind, parse_request

CONFIG = """
[routing]
default_registry = "docker.io"
allow_unconfigured = ["*.corp.example", "127.0.0.1:*"]

[upstreams."docker.io"]
mirrors = [{ url = "https://mirror.gcr.io", capabilities = ["pull"] },
           { url = "https://registry-1.docker.io" }]
[upstreams."gcr.io"]
[upstreams."quay.io"]
aliases = ["quay.example"]

[[routes]]
prefix = "gcr"
upstream = "gcr.io"
[[routes]]
prefix = "mirrors/quay"
upstream = "quay.io"
[[routes]]
prefix = "mirrors"
upstream = "docker.io"
[[routes]]
host = "gcr.mirror.corp"
upstream = "gcr.io"
"""


@pytest.fixture(scope="module")
def settings() -> Settings:
    return parse_settings(CONFIG, env={})


@pytest.fixture(scope="module")
def mapper(settings: Settings) -> Mapper:
    return Mapper(settings)


def req(path: str, *, ns: str | None = None, host: str = "mirror.corp:5000") -> OciRequest:
    query = [("ns", ns)] if ns else []
    return parse_request("GET", path, query=query, host=host)


@pytest.mark.parametrize(
    ("path", "ns", "host", "expected", "via"),
    [
        # Docker daemon registry-mirrors: root, no ns -> default registry.
        (
            "/v2/library/alpine/manifests/latest",
            None,
            "m",
            "docker.io/library/alpine:latest",
            RouteKind.DEFAULT,
        ),
        (
            "/v2/alpine/manifests/latest",
            None,
            "m",
            "docker.io/library/alpine:latest",
            RouteKind.DEFAULT,
        ),
        # containerd: ?ns=<registry>.
        (
            "/v2/library/alpine/manifests/3",
            "docker.io",
            "m",
            "docker.io/library/alpine:3",
            RouteKind.NAMESPACE,
        ),
        (
            "/v2/istio-release/pilot/manifests/1.9.1",
            "gcr.io",
            "m",
            "gcr.io/istio-release/pilot:1.9.1",
            RouteKind.NAMESPACE,
        ),
        ("/v2/a/b/manifests/1", "index.docker.io", "m", "docker.io/a/b:1", RouteKind.NAMESPACE),
        ("/v2/a/manifests/1", "quay.example", "m", "quay.io/a:1", RouteKind.NAMESPACE),
        ("/v2/x/manifests/1", "127.0.0.1:5001", "m", "127.0.0.1:5001/x:1", RouteKind.NAMESPACE),
        # Registry host as a path prefix.
        (
            "/v2/gcr.io/istio-release/pilot/manifests/1.9.1",
            None,
            "m",
            "gcr.io/istio-release/pilot:1.9.1",
            RouteKind.REGISTRY,
        ),
        (
            "/v2/docker.io/alpine/manifests/1",
            None,
            "m",
            "docker.io/library/alpine:1",
            RouteKind.REGISTRY,
        ),
        (
            "/v2/registry.corp.example/team/app/manifests/1",
            None,
            "m",
            "registry.corp.example/team/app:1",
            RouteKind.REGISTRY,
        ),
        # Named aliases, longest first.
        (
            "/v2/gcr/istio-release/pilot/manifests/1.9.1",
            None,
            "m",
            "gcr.io/istio-release/pilot:1.9.1",
            RouteKind.PREFIX,
        ),
        (
            "/v2/mirrors/quay/coreos/etcd/manifests/v3",
            None,
            "m",
            "quay.io/coreos/etcd:v3",
            RouteKind.PREFIX,
        ),
        (
            "/v2/mirrors/alpine/manifests/3",
            None,
            "m",
            "docker.io/library/alpine:3",
            RouteKind.PREFIX,
        ),
        # containerd host URL with a path: /<prefix>/v2/...
        (
            "/gcr/v2/istio-release/pilot/manifests/1",
            "gcr.io",
            "m",
            "gcr.io/istio-release/pilot:1",
            RouteKind.PREFIX,
        ),
        (
            "/mirrors/quay/v2/coreos/etcd/manifests/1",
            None,
            "m",
            "quay.io/coreos/etcd:1",
            RouteKind.PREFIX,
        ),
        (
            "/gcr.io/v2/istio-release/pilot/manifests/1",
            None,
            "m",
            "gcr.io/istio-release/pilot:1",
            RouteKind.REGISTRY,
        ),
        # Host-name routes.
        (
            "/v2/istio-release/pilot/manifests/1",
            None,
            "gcr.mirror.corp",
            "gcr.io/istio-release/pilot:1",
            RouteKind.HOST,
        ),
        (
            "/v2/istio-release/pilot/manifests/1",
            None,
            "GCR.Mirror.Corp:443",
            "gcr.io/istio-release/pilot:1",
            RouteKind.HOST,
        ),
        # Three-level names and names with /manifests/ inside.
        (
            "/v2/team/sub/app/manifests/v1",
            None,
            "m",
            "docker.io/team/sub/app:v1",
            RouteKind.DEFAULT,
        ),
        (
            "/v2/a/manifests/b/manifests/v1",
            None,
            "m",
            "docker.io/a/manifests/b:v1",
            RouteKind.DEFAULT,
        ),
    ],
)
def test_dialects_route_to_upstream(
    mapper: Mapper, path: str, ns: str | None, host: str, expected: str, via: RouteKind
) -> None:
    """Each client dialect resolves to the expected canonical reference and route kind."""
    resolution = mapper.resolve(req(path, ns=ns, host=host))
    assert str(resolution.reference) == expected
    assert resolution.via is via


def test_resolution_carries_mirrors_in_failover_order(mapper: Mapper) -> None:
    """The resolution hands over the upstream's mirrors in their configured order."""
    resolution = mapper.resolve(req("/v2/library/alpine/blobs/sha256:" + "0" * 64))
    assert [m.url for m in resolution.upstream.mirrors] == [
        "https://mirror.gcr.io",
        "https://registry-1.docker.io",
    ]
    assert resolution.reference.digest is not None and resolution.reference.tag is None


@pytest.mark.parametrize(
    ("path", "ns", "host", "code"),
    [
        ("/v2/evil.example/x/manifests/1", None, "m", ErrorCode.NAME_UNKNOWN),
        ("/v2/x/manifests/1", "evil.example", "m", ErrorCode.NAME_UNKNOWN),
        ("/v2/x/manifests/1", "169.254.169.254", "m", ErrorCode.NAME_UNKNOWN),
        ("/v2/localhost/x/manifests/1", None, "m", ErrorCode.NAME_UNKNOWN),
        ("/nope/v2/x/manifests/1", None, "m", ErrorCode.NAME_UNKNOWN),
        ("/gcr/v2/x/manifests/1", "quay.io", "m", ErrorCode.NAME_UNKNOWN),
        ("/v2/x/manifests/1", "quay.io", "gcr.mirror.corp", ErrorCode.NAME_UNKNOWN),
        ("/v2/x/manifests/1", "bad host!", "m", ErrorCode.NAME_INVALID),
        ("/v2/UPPER/manifests/1", None, "m", ErrorCode.NAME_INVALID),
        ("/v2/a..b/manifests/1", None, "m", ErrorCode.NAME_INVALID),
    ],
)
def test_unrouted_or_invalid_names_are_refused(
    mapper: Mapper, path: str, ns: str | None, host: str, code: ErrorCode
) -> None:
    """Names of unconfigured hosts and invalid names are refused before any upstream is chosen."""
    with pytest.raises(RegistryError) as info:
        mapper.resolve(req(path, ns=ns, host=host))
    assert info.value.code is code


def test_pattern_upstream_uses_defaults(mapper: Mapper) -> None:
    """A host admitted by allow_unconfigured gets its own endpoint and the default settings."""
    resolution = mapper.resolve(req("/v2/app/manifests/1", ns="registry.corp.example"))
    upstream = resolution.upstream
    assert upstream.from_pattern and upstream.name == "registry.corp.example"
    assert [m.url for m in upstream.mirrors] == ["https://registry.corp.example"]


@pytest.mark.parametrize(
    ("method", "path", "kind", "name", "ref"),
    [
        ("GET", "/v2/", RequestKind.BASE, "", ""),
        ("GET", "/v2", RequestKind.BASE, "", ""),
        ("HEAD", "/v2/a/b/manifests/v1", RequestKind.MANIFEST, "a/b", "v1"),
        ("GET", "/v2/a/blobs/sha256:" + "1" * 64, RequestKind.BLOB, "a", "sha256:" + "1" * 64),
        ("GET", "/v2/a/b/tags/list", RequestKind.TAGS, "a/b", ""),
        (
            "GET",
            "/v2/a/referrers/sha256:" + "2" * 64,
            RequestKind.REFERRERS,
            "a",
            "sha256:" + "2" * 64,
        ),
        ("POST", "/v2/a/blobs/uploads/", RequestKind.UPLOAD, "a", ""),
        ("PATCH", "/v2/a/blobs/uploads/abc", RequestKind.UPLOAD, "a", ""),
        (
            "GET",
            "/v2/blobs/blobs/sha256:" + "3" * 64,
            RequestKind.BLOB,
            "blobs",
            "sha256:" + "3" * 64,
        ),
    ],
)
def test_request_parsing(method: str, path: str, kind: RequestKind, name: str, ref: str) -> None:
    """Paths split at the last endpoint keyword into kind, name and reference."""
    parsed = parse_request(method, path)
    assert (parsed.kind, parsed.name, parsed.reference) == (kind, name, ref)
    assert parsed.upload_id == ("abc" if method == "PATCH" else None)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/", ErrorCode.NOT_FOUND),
        ("/v1/_ping", ErrorCode.NOT_FOUND),
        ("/v2/a/blobs/sha256:xyz", ErrorCode.BLOB_UNKNOWN),
        ("/v2/a/manifests/-bad", ErrorCode.MANIFEST_UNKNOWN),
        ("/v2/a/tags/other", ErrorCode.NOT_FOUND),
        ("/v2//manifests/x", ErrorCode.NAME_INVALID),
        ("/v2/a/unknown", ErrorCode.NOT_FOUND),
    ],
)
def test_bad_paths_get_oci_errors(path: str, code: ErrorCode) -> None:
    """Paths that are not distribution API paths raise RegistryError with a fitting code."""
    with pytest.raises(RegistryError) as info:
        parse_request("GET", path)
    assert info.value.code is code


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/v2/a/manifests/.INVALID_MANIFEST_NAME", ErrorCode.MANIFEST_UNKNOWN),
        ("HEAD", "/v2/a/manifests/.INVALID_MANIFEST_NAME", ErrorCode.MANIFEST_UNKNOWN),
        ("GET", "/v2/a/manifests/sha256:totallywrong", ErrorCode.MANIFEST_UNKNOWN),
        ("HEAD", "/v2/a/blobs/md5:" + "0" * 32, ErrorCode.BLOB_UNKNOWN),
        ("GET", "/v2/a/referrers/sha256:short", ErrorCode.MANIFEST_UNKNOWN),
        ("PUT", "/v2/a/manifests/.INVALID_MANIFEST_NAME", ErrorCode.MANIFEST_INVALID),
        ("PUT", "/v2/a/manifests/sha256:totallywrong", ErrorCode.DIGEST_INVALID),
        ("DELETE", "/v2/a/manifests/sha256:totallywrong", ErrorCode.DIGEST_INVALID),
        ("DELETE", "/v2/a/blobs/sha256:xyz", ErrorCode.DIGEST_INVALID),
    ],
)
def test_invalid_references_are_unknown_to_pulls_and_invalid_to_pushes(
    method: str, path: str, code: ErrorCode
) -> None:
    """A reference that cannot exist is 404 *_UNKNOWN on GET/HEAD (the conformance suite's
    expectation) and a 400 on a push or delete; the message says why."""
    with pytest.raises(RegistryError) as info:
        parse_request(method, path)
    assert info.value.code is code
    pull = method in ("GET", "HEAD")
    assert info.value.message.endswith("no such reference can exist") is pull


def test_accept_lines_are_all_read() -> None:
    """Several Accept lines (podman) and comma lists with parameters (containerd) are merged."""
    parsed = parse_request(
        "GET",
        "/v2/a/manifests/1",
        accept=["application/vnd.oci.image.index.v1+json", "a/b;q=0.5, */*"],
    )
    assert parsed.accept == ("application/vnd.oci.image.index.v1+json", "a/b", "*/*")
