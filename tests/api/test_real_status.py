"""The status page of a real gateway, after real pulls, in headless Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.browser import INSTALL_HINT, Chromium, find_chromium
from tests.support.clients import Skopeo
from tests.support.gateway import GatewayProcess
from tests.support.images import session_factory
from tests.support.registry import DistributionRegistry

pytestmark = [pytest.mark.real, pytest.mark.skipif(find_chromium() is None, reason=INSTALL_HINT)]


def test_status_page_shows_upstreams_and_hit_ratio(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """After a pull and a repeat, the page lists the upstreams and a non-zero hit ratio."""
    factory = session_factory(tmp_path_factory)
    with DistributionRegistry(tmp_path / "hub") as registry:
        image = factory.push(factory.small("status", seed=41), registry, "library/s", "1")
        config = f"""
[cache]
directory = "{tmp_path / "cache"}"
[upstreams."docker.io"]
mirrors = [{{ url = "{registry.url}" }}]
[upstreams."quay.io"]
mirrors = [{{ url = "http://127.0.0.1:9" }}]
"""
        with GatewayProcess(tmp_path / "gw", config) as gateway:
            for attempt in range(2):
                local = Skopeo().copy_to_local(
                    f"{gateway.host}/library/s:1", tmp_path / f"p{attempt}"
                )
                assert local.manifest_digest == image.digest
            dom = Chromium(tmp_path / "chromium").dump_dom(f"{gateway.url}/_/")
    dom = dom.replace("<wbr>", "")  # the page offers line breaks inside long names
    assert "docker.io" in dom and "quay.io" in dom
    assert registry.url in dom  # the mirror's URL
    assert "library/s:1" in dom  # a recent pull
    ratios = [float(r) for r in re.findall(r"(\d+\.\d)%", dom)]
    assert any(r > 0 for r in ratios), ratios
