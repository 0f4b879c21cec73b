"""The configuration model: frozen, validated settings as the rest of mirrorrouter sees them."""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mirrorrouter.reference import registry_endpoint


class ConfigError(ValueError):
    """One or more problems in a configuration file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class Capability(enum.Enum):
    """What a mirror may be asked (containerd's host capabilities)."""

    PULL = "pull"  # content by digest: manifests by digest and blobs, always verified
    RESOLVE = "resolve"  # what digest a tag points to; only trusted mirrors get this


@dataclass(frozen=True, slots=True)
class Secret:
    """A credential value that never shows itself in a repr, a log or an error."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


# The user info of any URL in a text: "http://user:pw@proxy:3128" -> "http://***@proxy:3128".
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")
_BARE_USERINFO_RE = re.compile(r"[^/\s]*@[^/\s@]+(/\S*)?")


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message naming URLs) with every URL's ``user:password@`` hidden.

    Proxy URLs may carry credentials; they are shown (check-config, resolve, the status
    page, logs and error details) only through this. A lone value without a scheme
    (``user:password@proxy:3128``, as a proxy variable may be written) is hidden too."""
    if "://" not in text and _BARE_USERINFO_RE.fullmatch(text):
        return "***@" + text.rpartition("@")[2]
    return _USERINFO_RE.sub(r"\1***@", text)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: Secret


@dataclass(frozen=True, slots=True)
class Mirror:
    """One endpoint of an upstream registry; the list order is the failover order."""

    url: str  # base URL without a trailing slash; requests go to url + "/v2/..."
    capabilities: frozenset[Capability]

    @property
    def can_resolve(self) -> bool:
        return Capability.RESOLVE in self.capabilities

    @property
    def name(self) -> str:
        """A short name for logs and error details: scheme-less host and path."""
        return self.url.split("://", 1)[-1]


@dataclass(frozen=True, slots=True)
class ObjectStoreSettings:
    """An S3-compatible bucket holding cached content (``[cache] backend = "s3"``)."""

    bucket: str
    endpoint: str | None = None  # http(s)://host:port of an S3-compatible server; None: AWS
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket; each upstream adds its own directory name
    access_key_id: Secret | None = None  # from the environment; None: the store's defaults
    secret_access_key: Secret | None = None
    # Answer blob GETs with a redirect to a presigned URL (clients must reach the store).
    redirect: bool = False


@dataclass(frozen=True, slots=True)
class CacheSettings:
    backend: str
    directory: Path  # filesystem: the cache itself; s3: local spool files of downloads
    # Bytes this cache may hold (``[cache]``: all caches together); None: no bound.
    max_size: int | None = None
    # Glob patterns over canonical ``name:tag`` whose images are never evicted (``[cache]``;
    # an upstream's settings carry the same list).
    pins: tuple[str, ...] = ()
    object_store: ObjectStoreSettings | None = None  # set when backend == "s3"
    key: str = ""  # this cache's own directory in the object store (the upstream's name)


@dataclass(frozen=True, slots=True)
class CoordinationSettings:
    """How replicas share single-flight locks, tag and negative caches, circuit state."""

    backend: str = "local"  # "local": in this process (and flocks on a shared directory)
    redis_url: Secret | None = None  # redis://[:password@]host:port/db, for backend "redis"
    key_prefix: str = "mirrorrouter"
    lock_ttl: float = 30.0  # a fill lock expires this long after its holder stops renewing it
    # How the other replicas reach this one (followers stream a fill in progress from it).
    advertise_url: str | None = None


@dataclass(frozen=True, slots=True)
class AccessRule:
    """Who may pull which repositories of one upstream; the first matching rule decides.

    Principals: ``anonymous`` (everyone, logged in or not), ``authenticated`` (any user who
    logged in), a user name, or ``group:<name>``.
    """

    repositories: tuple[str, ...]  # glob patterns on the repository path within the upstream
    pull: frozenset[str]
    push: frozenset[str] = frozenset()  # hosted repositories only: who may push and delete


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """How to trust an upstream's TLS (a corporate CA) and prove who we are (client cert)."""

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """Everything about one upstream registry, keyed by its canonical registry name."""

    name: str
    aliases: frozenset[str]
    mirrors: tuple[Mirror, ...]
    credentials: Credentials | None
    cache: CacheSettings
    policy: UpstreamPolicy
    access: tuple[AccessRule, ...] = ()  # no rules: anyone may pull
    tls: TlsSettings = field(default_factory=TlsSettings)
    from_pattern: bool = False  # made on demand for a host matched by routing.allow_unconfigured


# Above the largest layer the big cloud registries take (Amazon ECR: 52,000 MiB), so an
# image that can be pushed anywhere can be pushed here; still a bound on one request.
DEFAULT_MAX_BLOB_SIZE = 64 * 1024**3
# Once a day: what the garbage of a day of pushes and deletes costs to keep is small, and a
# walk of the set's storage a day is cheap; gc_grace protects pushes in progress.
DEFAULT_GC_INTERVAL = 86400.0


@dataclass(frozen=True, slots=True)
class HostedSettings:
    """A hosted (local, writable) repository set: images pushed here, served from here.

    Stored by the same storage layer as the caches, but never evicted: it is the only copy.
    Its canonical names are ``<name>/<repository>``.
    """

    name: str
    aliases: frozenset[str]  # registry names routed here (``localhost:5000`` for ?ns=...)
    storage: CacheSettings
    access: tuple[AccessRule, ...] = ()  # no matching rule: see access/policy.py for the default
    delete: bool = False  # may clients DELETE manifests and tags
    gc_grace: float = 3600.0  # garbage collection spares blobs and manifests younger than this
    # How often the server collects garbage on its own, once across every worker and replica
    # (housekeeping.py); 0: never (``mirrorrouter gc`` from cron instead).
    gc_interval: float = DEFAULT_GC_INTERVAL
    # What clients may store (docs/hosted-and-groups.md, "Limits"): one blob's bytes, the
    # whole set's bytes (None: unbounded), open upload sessions, and how long a session may
    # stay idle before the server sweeps it.
    max_blob_size: int | None = DEFAULT_MAX_BLOB_SIZE
    quota: int | None = None
    max_uploads: int = 1000
    upload_ttl: float = 3600.0
    # Repository globs (over the repository as this set names it, or as the upstream it
    # would shadow names it) where a push may shadow a later upstream member of a group
    # (shadowing.py); empty: nowhere.
    allow_shadow: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """An ordered group of upstreams and hosted sets behind one name (a Nexus group).

    A pull takes the first member that has the reference; a push goes to ``writable``.
    """

    name: str
    aliases: frozenset[str]
    members: tuple[str, ...]  # upstream and hosted names, in order
    writable: str | None  # the hosted member pushes go to; None: the group is read-only


# What a route, an ``ns`` or the default registry leads to.
Target = UpstreamSettings | HostedSettings | GroupSettings


@dataclass(frozen=True, slots=True)
class Route:
    """A client-facing name for a target (upstream, hosted set, group): a prefix or a Host."""

    target: str
    prefix: str | None = None
    host: str | None = None

    @property
    def label(self) -> str:
        return f"prefix {self.prefix}" if self.prefix is not None else f"host {self.host}"


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """How one upstream is treated: cache lifetimes, timeouts, retries, circuit breaking.

    ``[defaults]`` sets these for every upstream; an upstream table overrides any of them.
    """

    tag_ttl: float = 300.0  # serve a tag from cache this long before revalidating
    max_stale: float = 7 * 86400.0  # serve a tag this long past its TTL when upstream fails
    negative_ttl: float = 30.0  # remember an upstream "not found" this long
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # between two reads of a body
    first_byte_timeout: float = 5.0  # to a response's headers; then the next mirror at once
    hedge: bool = True  # ask the next mirror too when one is slower than it usually is
    retry_attempts: int = 3  # tries of one mirror before failing over to the next
    retry_deadline: float = 120.0  # all tries of one request, across mirrors
    breaker_failures: int = 5  # consecutive failures that open a mirror's circuit
    breaker_cooldown: float = 30.0  # how long an open circuit skips its mirror
    # A tag list page or referrers index larger than this is the mirror's failure.
    max_list_bytes: int = 8 * 1024 * 1024
    # May carry user:password@, so never in a repr; shown only through redact_url.
    proxy: str | None = field(default=None, repr=False)
    # Blobs up to this size are fetched and verified before their first byte is sent, so a
    # corrupt mirror costs the client nothing when another has the blob; 0 turns it off.
    verify_before_send: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerTlsSettings:
    """``[server.tls]``: a listener of its own that speaks HTTPS (tls.py)."""

    port: int
    certificate: Path  # PEM: the server certificate, then any intermediates
    key: Path  # PEM: its private key
    # PEM CAs whose client certificates are required (mTLS); None: no client certificate.
    client_ca: Path | None = None
    min_version: str = "1.2"  # "1.2" or "1.3"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 5000  # the plain-HTTP listener; 0: none (only [server.tls] listens)
    workers: int = 1
    log_level: str = "info"
    access_log: bool = False  # uvicorn's per-request line costs about a fifth of throughput
    # Connection hygiene (server/protocol.py): a client that stops sending is closed after these.
    header_timeout: float = 10.0  # first byte (or accept) to complete request headers
    body_timeout: float = 30.0  # gap between body chunks while the app waits for them
    keepalive_timeout: float = 5.0  # idle between requests on a kept-alive connection
    send_timeout: float = 60.0  # a response the client stops reading
    max_connections: int = 4096  # per worker process; clamped to the descriptor limit
    tls: ServerTlsSettings | None = None


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client authentication: users from an htpasswd file, tokens from the gateway's realm."""

    htpasswd: Path
    secret_file: Path  # the key tokens are signed with, shared by every worker
    token_ttl: float = 900.0
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    realm: str | None = None  # the token endpoint's public URL; default: from the request
    service: str = "mirrorrouter"
    # Who may see the status page and /metrics: principals as in access rules.
    monitoring: frozenset[str] = frozenset({"authenticated"})


@dataclass(frozen=True, slots=True)
class AccessSettings:
    """Gateway-wide allow and deny lists of canonical repository names (glob patterns)."""

    allow: tuple[str, ...] = ()  # empty: everything not denied
    deny: tuple[str, ...] = ()  # wins over allow


@dataclass(frozen=True, slots=True)
class AuditSettings:
    file: Path | None = None  # one JSON line per pull; None: no audit log


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole, validated configuration."""

    server: ServerSettings
    cache: CacheSettings
    defaults: UpstreamPolicy
    upstreams: Mapping[str, UpstreamSettings]
    routes: tuple[Route, ...]
    default_registry: str
    allow_unconfigured: tuple[str, ...]
    auth: AuthSettings | None = None
    access: AccessSettings = field(default_factory=AccessSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    source: Path | None = None
    hosted: Mapping[str, HostedSettings] = field(default_factory=dict)
    groups: Mapping[str, GroupSettings] = field(default_factory=dict)
    coordination: CoordinationSettings = field(default_factory=CoordinationSettings)

    def target_for(self, name: str) -> Target | None:
        """The upstream, hosted set or group a name leads to (its own name or an alias)."""
        for table in (self.hosted, self.groups):
            found = table.get(name)
            if found is not None:
                return found
            for target in table.values():
                if name in target.aliases:
                    return target
        return self.upstream_for(name)

    def upstream_for(self, registry: str) -> UpstreamSettings | None:
        """The upstream serving a canonical registry name, or None when it is not routed."""
        found = self.upstreams.get(registry)
        if found is not None:
            return found
        for upstream in self.upstreams.values():
            if registry in upstream.aliases:
                return upstream
        if any(fnmatch.fnmatchcase(registry, pattern) for pattern in self.allow_unconfigured):
            return self._pattern_upstream(registry)
        return None

    def _pattern_upstream(self, registry: str) -> UpstreamSettings:
        return UpstreamSettings(
            name=registry,
            aliases=frozenset(),
            mirrors=(default_mirror(registry),),
            credentials=None,
            cache=CacheSettings(
                self.cache.backend,
                self.cache.directory / cache_dirname(registry),
                pins=self.cache.pins,
                object_store=self.cache.object_store,
                key=cache_dirname(registry),
            ),
            policy=self.defaults,
            from_pattern=True,
        )


def default_mirror(registry: str) -> Mirror:
    """The registry's own endpoint, trusted for tags and content."""
    return Mirror(registry_endpoint(registry), frozenset(Capability))


def cache_dirname(registry: str) -> str:
    """A directory name for a registry's cache (``127.0.0.1:5000`` -> ``127.0.0.1_5000``)."""
    return registry.replace(":", "_").replace("[", "").replace("]", "")


_GLOB_CHARACTERS = frozenset("*?[")


def pin_pattern_problem(pattern: str) -> str | None:
    """What is wrong with a pin pattern (a glob over canonical ``name:tag``), or None.

    Canonical names start with their registry, so a first component without glob characters
    must look like a registry host (``docker.io``, ``registry.corp:5000``, ``localhost``):
    ``alpine:*`` would never match anything; nor would a name with no tag and no glob.
    """
    if not pattern or any(c.isspace() for c in pattern):
        return "patterns without spaces"
    first = pattern.split("/", 1)[0]
    if "/" not in pattern:
        registry_first = pattern[0] in _GLOB_CHARACTERS  # a name always has a "/"
    else:
        registry_first = not _GLOB_CHARACTERS.isdisjoint(first) or (
            "." in first or ":" in first or first == "localhost"
        )
    if not registry_first:
        return (
            "patterns over canonical names, registry first, such as "
            "docker.io/library/alpine:* or gcr.io/distroless/*"
        )
    last = pattern.rsplit("/", 1)[-1]
    if _GLOB_CHARACTERS.isdisjoint(pattern) and ":" not in last and "@" not in last:
        return "patterns over name:tag, such as docker.io/library/alpine:* for every tag"
    return None
