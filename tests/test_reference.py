"""Image references: the grammar, canonicalization and the registry address of a name."""

from __future__ import annotations

import pytest

from mirrorrouter.reference import Digest, ImageReference, InvalidReference

SHA256 = "sha256:" + "a" * 64
SHA512 = "sha512:" + "b" * 128

# image name -> (registry, repository, tag, digest)
VALID = [
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("alpine:3.19", ("docker.io", "library/alpine", "3.19", None)),
    ("library/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("bitnami/redis:7", ("docker.io", "bitnami/redis", "7", None)),
    ("docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("index.docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("registry-1.docker.io/library/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("INDEX.DOCKER.IO/library/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("gcr.io/istio-release/pilot:1.9.1", ("gcr.io", "istio-release/pilot", "1.9.1", None)),
    ("gcr.io/foo", ("gcr.io", "foo", "latest", None)),
    ("foo.org/something/someimage", ("foo.org", "something/someimage", "latest", None)),
    ("localhost/foo", ("localhost", "foo", "latest", None)),
    ("localhost:5000/foo/bar:v1", ("localhost:5000", "foo/bar", "v1", None)),
    ("127.0.0.1:5001/a/b/c", ("127.0.0.1:5001", "a/b/c", "latest", None)),
    ("[::1]:5000/foo", ("[::1]:5000", "foo", "latest", None)),
    ("Registry.Corp/team/app", ("registry.corp", "team/app", "latest", None)),
    ("alpine@" + SHA256, ("docker.io", "library/alpine", None, SHA256)),
    ("alpine:3@" + SHA256, ("docker.io", "library/alpine", "3", SHA256)),
    ("quay.io/a/b@" + SHA512, ("quay.io", "a/b", None, SHA512)),
    ("a_b/c__d/e---f.g", ("docker.io", "a_b/c__d/e---f.g", "latest", None)),
    ("foo:_tag", ("docker.io", "library/foo", "_tag", None)),
    ("foo:" + "T" * 128, ("docker.io", "library/foo", "T" * 128, None)),
    ("localhost:5000", ("docker.io", "library/localhost", "5000", None)),
]

INVALID = [
    "",
    " alpine",
    "Alpine",
    "alpine:",
    "alpine:-tag",
    "alpine:" + "t" * 129,
    "alpine:a/b",
    "library//alpine",
    "/alpine",
    "alpine/",
    "a..b",
    "a-",
    "_a",
    "a__-b",
    "gcr.io/",
    "alpine@sha256:abc",
    "alpine@sha256:" + "A" * 64,
    "alpine@md5:" + "a" * 32,
    "alpine@" + "a" * 64,
    "gcr.io/UPPER/case",
    "-bad.host/foo",
    "a/" * 130 + "b",
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_names_canonicalize(
    text: str, expected: tuple[str, str, str | None, str | None]
) -> None:
    """Each valid name parses into its canonical registry, repository, tag and digest."""
    ref = ImageReference.parse(text)
    registry, repository, tag, digest = expected
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest


@pytest.mark.parametrize("text", INVALID)
def test_invalid_names_are_refused(text: str) -> None:
    """Each invalid name raises InvalidReference, never a partial reference."""
    with pytest.raises(InvalidReference):
        ImageReference.parse(text)


# The reference table of issue 2: image name, canonical name, registry address.
REFERENCE_TABLE = [
    (
        "alpine",
        "docker.io/library/alpine",
        "https://registry-1.docker.io/v2/library/alpine/manifests/latest",
    ),
    (
        "gcr.io/istio-release/pilot:1.9.1",
        "gcr.io/istio-release/pilot",
        "https://gcr.io/v2/istio-release/pilot/manifests/1.9.1",
    ),
    (
        "foo.org/something/someimage",
        "foo.org/something/someimage",
        "https://foo.org/v2/something/someimage/manifests/latest",
    ),
]


@pytest.mark.parametrize(("image", "canonical", "address"), REFERENCE_TABLE)
def test_reference_table(image: str, canonical: str, address: str) -> None:
    """The three rows of the reference table: canonical name and registry address."""
    ref = ImageReference.parse(image)
    assert ref.name == canonical
    assert ref.manifest_url() == address


def test_digest_reference_addresses_the_digest() -> None:
    """A reference with a digest addresses the manifest by digest, not by tag."""
    ref = ImageReference.parse(f"gcr.io/a/b:1@{SHA256}")
    assert ref.manifest_url() == f"https://gcr.io/v2/a/b/manifests/{SHA256}"
    assert str(ref) == f"gcr.io/a/b:1@{SHA256}"


def test_default_registry_is_configurable() -> None:
    """A name without a registry host lands on the default registry, without library/."""
    ref = ImageReference.parse("team/app", default_registry="registry.corp")
    assert ref.name == "registry.corp/team/app"
    assert ImageReference.parse("app", default_registry="registry.corp").repository == "app"


def test_digest_of_bytes_and_parse_round_trip() -> None:
    """Digest.of hashes bytes; parse and str round-trip; sha512 is accepted."""
    digest = Digest.of(b"hello")
    assert str(digest) == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert Digest.parse(str(digest)) == digest
    assert Digest.parse(SHA512).algorithm == "sha512"
    assert Digest.of(b"x", "sha512").hasher().name == "sha512"
