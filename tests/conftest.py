"""Shared fixtures: the asyncio backend, a fake registry with an image, the real-registry
building blocks (images built once, a registry of a test's own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fakeregistry import FakeRegistry, Image, make_image
from tests.support.images import ImageFactory, session_factory
from tests.support.registry import DistributionRegistry


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> FakeRegistry:
    """An in-process fake registry (tests/support/fakeregistry.py)."""
    return FakeRegistry()


@pytest.fixture
def image(fake: FakeRegistry) -> Image:
    """library/alpine:3.19 on the fake registry, with two layers."""
    return fake.add(make_image("library/alpine", [b"layer-one" * 1000, b"layer-two"]), "3.19")


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    """Test images, built once per session."""
    return session_factory(tmp_path_factory)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DistributionRegistry]:
    """A distribution registry of this test's own, standing in for docker.io."""
    with DistributionRegistry(tmp_path / "upstream") as registry:
        yield registry
