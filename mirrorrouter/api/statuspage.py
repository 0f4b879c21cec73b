"""The status page: one server-rendered HTML page of what the gateway is doing.

``render_status(snapshot)`` turns a ``StatusSnapshot`` (plain frozen values the monitor
takes from the live counters, monitor.py) into a complete HTML document: no JavaScript,
inline CSS, and a ``<meta http-equiv="refresh">`` so an open page follows the numbers.
Every value that came from a config file, a client or an upstream (names, URLs, user names,
references) is escaped with ``html.escape``; the page has no other way to put text into the
document.

Times are Unix seconds (``time.time()``), shown in UTC.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from mirrorrouter.api.monitor import HostedStatus, RecentPull, StatusSnapshot, UpstreamStatus
from mirrorrouter.oci import CacheResult
from mirrorrouter.sizes import format_size

REFRESH_SECONDS = 10
SHORT_DIGEST = 12  # hex digits of a digest shown in the table (the full one in its title)

# Circuit states as breaker.CircuitState values; any other text is shown as it is.
CIRCUIT_CLASSES = {"closed": "ok", "half-open": "warn", "open": "bad"}
# X-Cache results.
CACHE_CLASSES: dict[str, str] = {
    CacheResult.HIT: "ok",
    CacheResult.STALE: "warn",
    CacheResult.MISS: "info",
}


def render_status(snapshot: StatusSnapshot, *, now: float | None = None) -> str:
    """The whole page; ``now`` (Unix seconds, default the current time) is for the uptime."""
    now = time.time() if now is None else now
    totals = snapshot.totals
    parts = [
        _HEAD,
        "<body>\n<header>\n<h1>mirrorrouter</h1>\n",
        f'<p class="meta">version {_e(snapshot.version)} · started '
        f"{_time(snapshot.started_at)} · up {_e(_duration(now - snapshot.started_at))} · "
        f"refreshes every {REFRESH_SECONDS} s</p>\n</header>\n<main>\n",
        _summary(snapshot, totals),
        _cache_table(snapshot.upstreams, totals),
        _mirror_table(snapshot.upstreams),
        _hosted_table(snapshot.hosted, now),
        _recent_table(snapshot.recent),
        "</main>\n</body>\n</html>\n",
    ]
    return "".join(parts)


# ---------------------------------------------------------------------------- sections


def _summary(snapshot: StatusSnapshot, totals: UpstreamStatus) -> str:
    served = totals.bytes_from_cache + totals.bytes_from_upstream
    share = totals.bytes_from_cache / served if served else None
    mirrors = [m for u in snapshot.upstreams for m in u.mirrors]
    healthy = sum(1 for m in mirrors if m.circuit == "closed")
    cards = [
        _card("Hit ratio", _ratio(totals.hit_ratio), _ratio_bar(totals.hit_ratio),
              f"{_plural(totals.hits, 'hit')} of {_plural(totals.requests, 'answer')}"),
        _card("Served from cache", _bytes(totals.bytes_from_cache), _ratio_bar(share),
              "nothing served yet" if share is None else
              f"{_ratio(share)} of bytes · {_bytes(totals.bytes_from_upstream)} from upstream"),
        _card("Cache", _bytes(totals.cache_bytes), "",
              _plural(totals.cache_entries, "entry", "entries")),
        _card("Mirrors", f"{healthy} / {len(mirrors)}", "",
              f"circuits closed · {_plural(len(snapshot.upstreams), 'upstream')}"),
    ]  # fmt: skip
    return f'<section class="cards">\n{"".join(cards)}</section>\n'


def _card(label: str, value: str, bar: str, note: str) -> str:
    # Callers pass text that is already escaped (numbers, or _e/_bytes/_ratio output).
    return (
        f'<div class="card"><div class="label">{label}</div>'
        f'<div class="value">{value}</div>{bar}<div class="note">{note}</div></div>\n'
    )


def _cache_table(upstreams: tuple[UpstreamStatus, ...], totals: UpstreamStatus) -> str:
    head = "<section>\n<h2>Cache per upstream</h2>\n" + _table_start(
        ("upstream", ""),
        ("cache size", "num"),
        ("entries", "num"),
        ("hits", "num"),
        ("misses", "num"),
        ("stale", "num"),
        ("hit ratio", "ratio"),
        ("from cache", "num"),
        ("from upstream", "num"),
    )
    if not upstreams:
        return head + _empty_row(9, "No upstreams are configured.") + _TABLE_END

    def row(u: UpstreamStatus, css: str = "") -> str:
        return (
            f'<tr{_class(css)}><th scope="row">{_e(u.name)}</th>'
            f'<td class="num">{_bytes(u.cache_bytes)}</td>'
            f'<td class="num">{_count(u.cache_entries)}</td>'
            f'<td class="num">{_count(u.hits)}</td>'
            f'<td class="num">{_count(u.misses)}</td>'
            f'<td class="num">{_count(u.stale)}</td>'
            f'<td class="ratio">{_ratio_cell(u.hit_ratio)}</td>'
            f'<td class="num">{_bytes(u.bytes_from_cache)}</td>'
            f'<td class="num">{_bytes(u.bytes_from_upstream)}</td></tr>\n'
        )

    body = "".join(row(u) for u in upstreams)
    if len(upstreams) > 1:
        body += row(totals, "total")
    return head + body + _TABLE_END


def _mirror_table(upstreams: tuple[UpstreamStatus, ...]) -> str:
    head = "<section>\n<h2>Mirrors</h2>\n" + _table_start(
        ("upstream", ""),
        ("mirror", ""),
        ("capabilities", ""),
        ("circuit", ""),
        ("failures", "num"),
    )
    rows = []
    for u in upstreams:
        if not u.mirrors:
            rows.append(
                f'<tr><th scope="row">{_e(u.name)}</th>'
                '<td colspan="4" class="muted">no mirrors</td></tr>\n'
            )
        for i, m in enumerate(u.mirrors):
            first = i == 0
            via = f'<br><span class="muted">via proxy {_e(u.proxy)}</span>' if u.proxy else ""
            name = f'<th scope="row">{_e(u.name)}{via}</th>' if first else '<td class="cont"></td>'
            state = CIRCUIT_CLASSES.get(m.circuit, "info")
            caps = " ".join(f'<span class="tag">{_e(c)}</span>' for c in m.capabilities)
            rows.append(
                f"<tr{_class('' if first else 'more')}>{name}"
                f'<td class="url">{_breakable(m.url)}</td><td>{caps or _DASH}</td>'
                f'<td><span class="badge {state}">{_e(m.circuit)}</span></td>'
                f'<td class="num">{_count(m.failures)}</td></tr>\n'
            )
    if not rows:
        rows.append(_empty_row(5, "No upstreams are configured."))
    return head + "".join(rows) + _TABLE_END


def _hosted_table(hosted: tuple[HostedStatus, ...], now: float) -> str:
    """Each hosted set's garbage collection: the last run, what it removed, the next."""
    if not hosted:
        return ""
    head = "<section>\n<h2>Hosted sets: garbage collection</h2>\n" + _table_start(
        ("hosted set", ""),
        ("every", ""),
        ("last run (UTC)", ""),
        ("outcome", ""),
        ("removed", ""),
        ("freed", "num"),
        ("next run (UTC)", ""),
    )
    rows = []
    for h in hosted:
        last = h.last_gc
        if last is None:
            ran, outcome, removed, freed = _e("never"), _DASH, _DASH, _DASH
        else:
            ran = f'<span title="by {_e(last.by)}">{_time(last.started)}</span>'
            css = "ok" if last.outcome == "ok" else "bad"
            why = f' title="{_e(last.error)}"' if last.error else ""
            outcome = f'<span class="badge {css}"{why}>{_e(last.outcome)}</span>'
            removed = _e(
                f"{_plural(last.blobs, 'blob')} · {_plural(last.manifests, 'manifest')} · "
                f"{_plural(last.uploads, 'upload')}"
            )
            freed = _bytes(last.freed)
        if h.next_gc is None:
            every, upcoming = _e("off"), _DASH
        else:
            every = _e(_duration(h.gc_interval))
            upcoming = _e("due now") if h.next_gc <= now else _time(h.next_gc)
        rows.append(
            f'<tr><th scope="row">{_e(h.name)}</th><td>{every}</td><td>{ran}</td>'
            f'<td>{outcome}</td><td>{removed}</td><td class="num">{freed}</td>'
            f"<td>{upcoming}</td></tr>\n"
        )
    return head + "".join(rows) + _TABLE_END


def _recent_table(recent: Iterable[RecentPull]) -> str:
    head = "<section>\n<h2>Recent pulls</h2>\n" + _table_start(
        ("time (UTC)", ""),
        ("user", ""),
        ("reference", ""),
        ("digest", ""),
        ("upstream", ""),
        ("cache", ""),
        ("bytes", "num"),
    )
    rows = []
    for p in recent:
        user = _e(p.user) if p.user else '<span class="muted">anonymous</span>'
        cache = CACHE_CLASSES.get(p.cache, "info")
        rows.append(
            f'<tr><td class="time">{_time(p.time)}</td><td>{user}</td>'
            f'<td class="ref">{_breakable(p.reference)}</td><td>{_digest(p.digest)}</td>'
            f"<td>{_e(p.upstream)}</td>"
            f'<td><span class="badge {cache}">{_e(p.cache)}</span></td>'
            f'<td class="num">{_bytes(p.bytes)}</td></tr>\n'
        )
    if not rows:
        rows.append(_empty_row(7, "No pulls yet."))
    return head + "".join(rows) + _TABLE_END


# ---------------------------------------------------------------------------- pieces

_DASH = '<span class="muted">—</span>'
_TABLE_END = "</tbody>\n</table>\n</div>\n</section>\n"


def _table_start(*columns: tuple[str, str]) -> str:
    cells = "".join(f'<th scope="col"{_class(css)}>{_e(name)}</th>' for name, css in columns)
    return f'<div class="table">\n<table>\n<thead><tr>{cells}</tr></thead>\n<tbody>\n'


def _class(css: str) -> str:
    return f' class="{css}"' if css else ""


def _empty_row(columns: int, text: str) -> str:
    return f'<tr><td colspan="{columns}" class="empty">{_e(text)}</td></tr>\n'


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one}" if n == 1 else f"{n:,} {many or one + 's'}"


def _breakable(text: str) -> str:
    """Escaped, with a line-break opportunity after each ``/`` of a long URL or name."""
    return "/<wbr>".join(_e(part) for part in text.split("/"))


def _count(n: int) -> str:
    return f"{n:,}"


def _bytes(n: int) -> str:
    """``1.5 GiB``, with the exact count in the title."""
    return f'<span title="{n:,} bytes">{format_size(n, bytes_as="{:,} B")}</span>'


def _ratio(ratio: float | None) -> str:
    return _DASH if ratio is None else f"{ratio * 100:.1f}%"


def _ratio_bar(ratio: float | None) -> str:
    width = 0.0 if ratio is None else max(0.0, min(1.0, ratio)) * 100
    return f'<div class="bar"><span style="width:{width:.1f}%"></span></div>'


def _ratio_cell(ratio: float | None) -> str:
    if ratio is None:
        return f'<span title="no answers yet">{_DASH}</span>'
    return f"{_ratio(ratio)}{_ratio_bar(ratio)}"


def _digest(digest: str) -> str:
    if not digest:
        return _DASH
    algorithm, _, hexpart = digest.partition(":")
    short = (hexpart or algorithm)[:SHORT_DIGEST]
    return f'<code title="{_e(digest)}">{_e(short)}</code>'


def _time(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return (
        f'<time datetime="{moment.isoformat(timespec="seconds")}">{moment:%Y-%m-%d %H:%M:%S}</time>'
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


_HEAD = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>mirrorrouter status</title>
<link rel="icon" href="data:,">
<style>
:root {{
  --fg: #1f2328; --muted: #6e7781; --line: #d8dee4; --bg: #f6f8fa; --card: #ffffff;
  --accent: #0969da; --ok: #1a7f37; --ok-bg: #dafbe1; --warn: #9a6700; --warn-bg: #fff8c5;
  --bad: #cf222e; --bad-bg: #ffebe9; --info: #0550ae; --info-bg: #ddf4ff;
}}
* {{ box-sizing: border-box; }}
body {{
  margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
}}
header {{ display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }}
h1 {{ font-size: 22px; margin: 0; }}
h2 {{ font-size: 15px; margin: 28px 0 8px; }}
.meta, .muted, .note, .label {{ color: var(--muted); }}
.meta {{ margin: 0; }}
.cards {{
  display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 12px;
  margin-top: 20px;
}}
.card {{
  background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px;
}}
.card .label {{ font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }}
.card .value {{ font-size: 26px; font-weight: 600; margin: 2px 0 6px; white-space: nowrap; }}
.card .note {{ font-size: 12px; margin-top: 6px; }}
.bar {{ height: 6px; background: var(--line); border-radius: 3px; overflow: hidden; }}
.bar span {{ display: block; height: 100%; background: var(--ok); }}
td .bar {{ width: 80px; display: inline-block; margin-left: 8px; vertical-align: middle; }}
.table {{
  background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  overflow-x: auto;
}}
table {{ width: 100%; border-collapse: collapse; }}
th, td {{ padding: 7px 12px; text-align: left; border-top: 1px solid var(--line);
  vertical-align: middle; }}
thead th {{
  border-top: 0; background: var(--bg); font-size: 12px; font-weight: 600; color: var(--muted);
  text-transform: uppercase; letter-spacing: .03em; white-space: nowrap;
}}
tbody th {{ font-weight: 600; }}
tr.more td, tr.more th {{ border-top-style: dashed; }}
tr.total th, tr.total td {{ background: var(--bg); font-weight: 600; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
.ratio {{ white-space: nowrap; font-variant-numeric: tabular-nums; }}
.url, .ref, code, .time {{
  font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, monospace;
  font-size: 12.5px; }}
.url, .ref {{ overflow-wrap: break-word; }}
tr.total th {{ white-space: nowrap; }}
.time {{ white-space: nowrap; }}
.empty {{ text-align: center; color: var(--muted); padding: 20px; }}
.tag {{
  display: inline-block; padding: 0 6px; margin-right: 4px; border-radius: 4px;
  background: var(--bg); border: 1px solid var(--line); font-size: 12px;
}}
.badge {{
  display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px;
  font-weight: 600;
}}
.badge.ok {{ color: var(--ok); background: var(--ok-bg); }}
.badge.warn {{ color: var(--warn); background: var(--warn-bg); }}
.badge.bad {{ color: var(--bad); background: var(--bad-bg); }}
.badge.info {{ color: var(--info); background: var(--info-bg); }}
</style>
</head>
"""
