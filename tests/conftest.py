"""Shared fixtures: the asyncio backend for anyio tests, a fake registry with an image."""

from __future__ import annotations

import pytest

from tests.support.fakeregistry import FakeRegistry, Image, make_image


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
