"""The status page renderer: hostile names stay text, the numbers are shown, empty state."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from mirrorrouter.api.monitor import MirrorStatus, RecentPull, StatusSnapshot, UpstreamStatus
from mirrorrouter.api.statuspage import render_status
from tests.support.fakeregistry import FakeRegistry
from tests.support.inprocess import config, gateway

STARTED = 1_717_243_200.0  # 2024-06-01 12:00:00 UTC
NOW = STARTED + 3 * 3600 + 25 * 60

VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}


class Page(HTMLParser):
    """Every element with its attributes, the visible text, and the tag nesting checked."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.in_style = False
        self.run = ""  # text so far, joined across <wbr> (a line-break hint, not a break)
        self.feed(text)
        self.close()
        self.flush()
        assert self.stack == [], f"unclosed elements: {self.stack}"

    def flush(self) -> None:
        if self.run.strip():
            self.text.append(" ".join(self.run.split()))
        self.run = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "wbr":
            self.flush()
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)
        self.in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self.flush()
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        self.in_style = False

    def handle_data(self, data: str) -> None:
        if not self.in_style:
            self.run += data

    @property
    def visible(self) -> str:
        return " | ".join(self.text)

    def tags(self) -> set[str]:
        return {tag for tag, _ in self.elements}

    def attribute_names(self) -> set[str]:
        return {name for _, attrs in self.elements for name in attrs}


def mirror(url: str, circuit: str = "closed", failures: int = 0) -> MirrorStatus:
    return MirrorStatus(url, ("pull", "resolve"), circuit, failures)


def upstream(name: str, *mirrors: MirrorStatus, **numbers: int) -> UpstreamStatus:
    values = {
        "cache_bytes": 0,
        "cache_entries": 0,
        "hits": 0,
        "misses": 0,
        "stale": 0,
        "bytes_from_cache": 0,
        "bytes_from_upstream": 0,
    }
    values.update(numbers)
    return UpstreamStatus(name, mirrors, **values)


def snapshot(*upstreams: UpstreamStatus, recent: tuple[RecentPull, ...] = ()) -> StatusSnapshot:
    return StatusSnapshot("0.1.0", STARTED, upstreams, recent)


def test_hit_ratio_counts_hits_among_all_answers() -> None:
    assert upstream("a", hits=3, misses=1).hit_ratio == 0.75
    assert upstream("a", hits=2, misses=1, stale=1).hit_ratio == 0.5
    assert upstream("a", misses=4).hit_ratio == 0.0
    assert upstream("a").hit_ratio is None


def test_numbers_ratios_and_states_are_shown() -> None:
    hub = upstream(
        "docker.io",
        mirror("https://registry-1.docker.io"),
        mirror("https://mirror.gcr.io", "open", 7),
        cache_bytes=3 * 1024**3 + 512 * 1024**2,
        cache_entries=1234,
        hits=3,
        misses=1,
        stale=0,
        bytes_from_cache=150 * 1024**2,
        bytes_from_upstream=50 * 1024**2,
    )
    quay = upstream(
        "quay.io",
        MirrorStatus("https://quay.io", ("resolve",), "half-open", 5),
        hits=1,
        misses=1,
        stale=2,
        cache_bytes=2048,
        cache_entries=2,
    )
    pull = RecentPull(
        STARTED + 60,
        "alice",
        "docker.io/library/alpine:3.19",
        "sha256:" + "ab12" * 16,
        "docker.io",
        "HIT",
        3_500_000,
    )
    page = Page(render_status(snapshot(hub, quay, recent=(pull,)), now=NOW))
    text = page.visible

    assert "version 0.1.0" in text
    assert "2024-06-01 12:00:00" in text  # started, UTC
    assert "up 3h 25m" in text
    # per upstream: size, entries, hits/misses/stale, ratio, bytes by source
    assert "3.5 GiB" in text and "1,234" in text
    assert "75.0%" in text  # docker.io: 3 of 4
    assert "25.0%" in text  # quay.io: 1 of 4 (stale is not a hit)
    assert "150.0 MiB" in text and "50.0 MiB" in text
    assert "2.0 KiB" in text
    # the totals: 4 hits of 8 answers
    assert "50.0%" in text and "4 hits of 8 answers" in text
    # mirrors with capabilities, circuit state and failures, in failover order
    assert text.index("https://registry-1.docker.io") < text.index("https://mirror.gcr.io")
    for state in ("closed", "open", "half-open"):
        assert f"| {state} |" in text
    assert "| open | 7" in text and "| half-open | 5" in text
    assert "1 / 3" in text  # closed circuits of all mirrors
    # the recent pull: time, user, reference, short digest, upstream, result, bytes
    assert "2024-06-01 12:01:00" in text
    assert "alice" in text and "docker.io/library/alpine:3.19" in text
    assert "ab12ab12ab12" in text and "ab12" * 16 not in text  # short, full in the title
    assert ("code", {"title": "sha256:" + "ab12" * 16}) in page.elements
    assert "| HIT |" in text and "3.3 MiB" in text
    # exact byte counts stay reachable in the titles
    assert ("span", {"title": "3,500,000 bytes"}) in page.elements


def test_hostile_names_are_text_not_markup() -> None:
    evil = '<script>alert("x")</script>'
    attr = '"><img src=x onerror=alert(1)>'
    hostile = upstream(
        evil,
        MirrorStatus(f"https://a.example/{attr}", (evil,), evil, 1),
        hits=1,
    )
    pull = RecentPull(STARTED, attr, f"docker.io/{evil}&x", f"sha256:{attr}", evil, attr, 1)
    out = render_status(snapshot(hostile, recent=(pull,)), now=NOW)
    page = Page(out)

    assert page.tags().isdisjoint({"script", "img"})
    assert not any(name.startswith("on") for name in page.attribute_names())
    assert "<script" not in out and "<img" not in out
    # ...and still there, readable, as text
    assert evil in page.visible
    assert f"https://a.example/{attr}" in page.visible
    assert f"docker.io/{evil}&x" in page.visible
    assert "&lt;script&gt;" in out and "&amp;x" in out and "&quot;&gt;" in out


def test_empty_state() -> None:
    page = Page(render_status(snapshot(), now=STARTED + 5))
    text = page.visible
    assert "No upstreams are configured." in text
    assert "No pulls yet." in text
    assert "up 5s" in text
    assert "0 / 0" in text


def test_no_answers_yet_shows_a_dash_not_a_ratio() -> None:
    idle = upstream("gcr.io", mirror("https://gcr.io"))
    page = Page(render_status(snapshot(idle), now=NOW))
    assert "%" not in page.visible
    assert "0 hits of 0 answers" in page.visible
    assert "| anonymous |" not in page.visible


def test_anonymous_user_missing_digest_and_mirrorless_upstream() -> None:
    bare = upstream("ghcr.io")
    pull = RecentPull(STARTED, "", "ghcr.io/org/tool:1", "", "ghcr.io", "MISS", 0)
    text = Page(render_status(snapshot(bare, recent=(pull,)), now=NOW)).visible
    assert "| anonymous |" in text
    assert "no mirrors" in text
    assert "| MISS | 0 B" in text


@pytest.mark.parametrize(
    ("count", "shown"),
    [(0, "0 B"), (1023, "1,023 B"), (1024, "1.0 KiB"), (5 * 1024**4, "5.0 TiB")],
)
def test_byte_counts(count: int, shown: str) -> None:
    hub = upstream("docker.io", mirror("https://registry-1.docker.io"), cache_bytes=count)
    assert shown in Page(render_status(snapshot(hub), now=NOW)).visible


def test_page_is_a_light_self_refreshing_document() -> None:
    out = render_status(snapshot(upstream("docker.io")), now=NOW)
    page = Page(out)
    assert out.startswith("<!doctype html>")
    assert ("meta", {"http-equiv": "refresh", "content": "10"}) in page.elements
    assert "script" not in page.tags()
    # nothing else to fetch: no images, no style sheets, the icon is an empty data: URL
    urls = [a[k] or "" for _, a in page.elements for k in ("src", "href") if k in a]
    assert urls == ["data:,"]


@pytest.mark.anyio
async def test_status_page_shows_an_upstreams_proxy_without_its_credentials(
    tmp_path: Path, fake: FakeRegistry
) -> None:
    """The live status page names an upstream's proxy with its user:password@ hidden."""
    text = config(tmp_path, 'proxy = "http://ops:s3cret@proxy.corp:3128"')
    async with gateway(tmp_path, fake, text) as gw:
        page = (await gw.client.get("/_/")).text
    assert "via proxy http://***@proxy.corp:3128" in Page(page).visible
    assert "s3cret" not in page and "ops:" not in page
