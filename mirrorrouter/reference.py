"""Image references: the grammar of container image names and their canonical form.

The grammar follows distribution/reference::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [ domain "/" ] path-component ( "/" path-component )*
    domain           := host [ ":" port ]
    host             := domain-component ( "." domain-component )* | "[" ipv6 "]"
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    path-component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag              := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest           := "sha256:" 64 hex | "sha512:" 128 hex

Normalization (what docker and containerd do to a name a user types):

- The first component is a registry host only if it contains "." or ":", is
  "localhost", or has an upper-case letter; otherwise the whole name lives on docker.io.
- "index.docker.io" and "registry-1.docker.io" are aliases of "docker.io".
- On docker.io only, a one-component name gets "library/" ("alpine" is
  "docker.io/library/alpine"); "gcr.io/foo" stays "foo".
- A reference with neither tag nor digest means the tag "latest".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "https://registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])"

PATH_COMPONENT_RE = re.compile(_PATH_COMPONENT)
REPOSITORY_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
REGISTRY_RE = re.compile(rf"{_HOST}(?::[0-9]+)?")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")


class InvalidReference(ValueError):
    """A string that is not a valid image name, tag, digest or reference."""


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest such as ``sha256:<64 hex>``; only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidReference(f"digest {text!r} has no algorithm prefix (want sha256:<hex>)")
        expected = _DIGEST_HEX_LENGTH.get(algorithm)
        if expected is None:
            raise InvalidReference(
                f"digest algorithm {algorithm!r} is not supported (want sha256 or sha512)"
            )
        if len(hexpart) != expected or not _HEX_RE.fullmatch(hexpart):
            raise InvalidReference(
                f"digest {text!r} is not {algorithm} followed by {expected} lower-case hex digits"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def looks_like_registry(component: str) -> bool:
    """Whether the first path component of a name is a registry host (the docker rule)."""
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.lower() != component
    )


def canonical_registry(host: str) -> str:
    """The canonical name of a registry host: lower case, docker.io for its aliases."""
    host = host.lower()
    if host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host


def validate_registry(host: str) -> str:
    """Check a registry host[:port] and return its canonical name."""
    if not REGISTRY_RE.fullmatch(host):
        raise InvalidReference(f"registry {host!r} is not a valid host[:port]")
    return canonical_registry(host)


def registry_endpoint(registry: str) -> str:
    """The API endpoint of a canonical registry name (docker.io has its own host)."""
    if registry == DOCKER_HUB:
        return DOCKER_HUB_ENDPOINT
    return f"https://{registry}"


def normalize_repository(registry: str, repository: str) -> str:
    """Validate a repository path on ``registry``; docker.io one-component names get library/."""
    if not repository:
        raise InvalidReference("repository name is empty")
    if repository.lower() != repository:
        raise InvalidReference(f"repository name {repository!r} must be lower case")
    if not REPOSITORY_RE.fullmatch(repository):
        raise InvalidReference(
            f"repository name {repository!r} is invalid: components are lower-case letters and "
            "digits separated by '.', '_', '__' or '-', joined by '/'"
        )
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise InvalidReference(f"name {registry}/{repository} is longer than {MAX_NAME_LENGTH}")
    return repository


def validate_tag(tag: str) -> str:
    """Check a tag against the grammar."""
    if not TAG_RE.fullmatch(tag):
        raise InvalidReference(
            f"tag {tag!r} is invalid: want [A-Za-z0-9_] then up to 127 of [A-Za-z0-9_.-]"
        )
    return tag


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A canonical image reference: registry, repository and a tag and/or a digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, default_registry: str = DOCKER_HUB) -> ImageReference:
        """Parse an image name as a user types it (``alpine``, ``gcr.io/x/y:1@sha256:..``)."""
        if not text or text != text.strip():
            raise InvalidReference(f"image name {text!r} is empty or has surrounding spaces")
        rest, at, digest_text = text.partition("@")
        digest = Digest.parse(digest_text) if at else None
        # The tag is after the last ":" provided no "/" follows it (a ":" before a "/"
        # is a registry port, as in localhost:5000/foo).
        tag: str | None = None
        colon = rest.rfind(":")
        if colon != -1 and "/" not in rest[colon + 1 :]:
            rest, tag = rest[:colon], validate_tag(rest[colon + 1 :])
        first, slash, remainder = rest.partition("/")
        if slash and looks_like_registry(first):
            registry, repository = validate_registry(first), remainder
        else:
            registry, repository = canonical_registry(default_registry), rest
        repository = normalize_repository(registry, repository)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """The canonical name without tag or digest: ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    def manifest_url(self, endpoint: str | None = None) -> str:
        """The manifest URL of this reference at ``endpoint`` (default: the registry's own)."""
        base = (endpoint or registry_endpoint(self.registry)).rstrip("/")
        return f"{base}/v2/{self.repository}/manifests/{self.reference}"

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
