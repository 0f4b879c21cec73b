"""``mirrorrouter resolve``: how image names are canonicalized and routed, as a table or
JSON (the canonical name, the registry address, the target with its mirrors or members,
the other routes to it)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mirrorrouter.cli.formatting import print_table
from mirrorrouter.cli.options import Subcommands, config_option
from mirrorrouter.config import Settings, UpstreamSettings, load_settings, redact_url
from mirrorrouter.config.discovery import find_config
from mirrorrouter.config.model import GroupSettings, Target
from mirrorrouter.errors import RegistryError
from mirrorrouter.mapping import Mapper, kind_of
from mirrorrouter.reference import ImageReference, InvalidReference


def register(sub: Subcommands) -> None:
    """Add ``resolve`` to the ``mirrorrouter`` parser."""
    resolve = sub.add_parser("resolve", help="show how image names are canonicalized and routed")
    config_option(resolve)
    resolve.add_argument("images", nargs="+", metavar="IMAGE")
    resolve.add_argument("--json", action="store_true", help="print JSON")
    resolve.set_defaults(func=_resolve)


@dataclass(frozen=True)
class Verdict:
    """How one image name is canonicalized and routed (or why it is not)."""

    image: str
    canonical: str | None
    address: str | None
    upstream: str | None  # the target's name (an upstream, hosted set or group)
    mirrors: list[dict[str, Any]]
    routes: list[str]
    error: str | None
    kind: str = "upstream"
    members: list[dict[str, Any]] = field(default_factory=list)  # a group's, in order
    proxy: str | None = None  # the upstream's outbound proxy, redacted

    @property
    def route_text(self) -> str:
        if self.canonical is None:
            return f"invalid name: {self.error}"
        if self.error:
            return f"not routed: {self.error}"
        if self.kind == "group":
            text = f"group {self.upstream}: " + " > ".join(
                f"{m['kind']} {m['name']} ({m['canonical_name']})"
                + (" [push]" if m["writable"] else "")
                for m in self.members
            )
        elif self.kind == "hosted":
            text = f"hosted {self.upstream}"
        else:
            text = f"upstream {self.upstream}: " + " > ".join(m["url"] for m in self.mirrors)
            if self.proxy:
                text += f" via proxy {self.proxy}"
        if self.routes:
            text += f" (also via {', '.join(self.routes)})"
        return text


def resolve_images(settings: Settings, images: Sequence[str]) -> list[Verdict]:
    """Canonicalize and route each image name."""
    mapper = Mapper(settings)
    verdicts = []
    for image in images:
        try:
            ref = ImageReference.parse(image)
        except InvalidReference as exc:
            verdicts.append(Verdict(image, None, None, None, [], [], str(exc)))
            continue
        try:
            resolution = mapper.resolve_image(ref)
        except RegistryError as exc:
            verdicts.append(Verdict(image, ref.name, ref.manifest_url(), None, [], [], exc.message))
            continue
        target = resolution.target
        members = []
        if isinstance(target, GroupSettings):
            for name in target.members:
                member = mapper.member(resolution, name)
                members.append(
                    {
                        "name": name,
                        "kind": kind_of(member.target),
                        "canonical_name": member.reference.name,
                        "writable": name == target.writable,
                        "mirrors": _mirrors(member.target),
                    }
                )
        routes = [r.label for r in mapper.routes_to(target)]
        verdicts.append(
            Verdict(
                image,
                resolution.reference.name,
                ref.manifest_url(),
                target.name,
                _mirrors(target),
                routes,
                None,
                kind_of(target),
                members,
                shown_proxy(target),
            )
        )
    return verdicts


def shown_proxy(target: Target) -> str | None:
    """The configured outbound proxy, fit to show: it may carry user:password@."""
    if not isinstance(target, UpstreamSettings) or target.policy.proxy is None:
        return None
    return redact_url(target.policy.proxy)


def _mirrors(target: Target) -> list[dict[str, Any]]:
    if not isinstance(target, UpstreamSettings):
        return []
    return [
        {"url": m.url, "capabilities": sorted(c.value for c in m.capabilities)}
        for m in target.mirrors
    ]


def _resolve(args: argparse.Namespace) -> int:
    settings = load_settings(find_config(args.config))
    verdicts = resolve_images(settings, args.images)
    if args.json:
        print(json.dumps([_verdict_json(v) for v in verdicts], indent=2))
    else:
        header = ("IMAGE NAME", "CANONICAL NAME", "REGISTRY ADDRESS", "ROUTE")
        rows = [(v.image, v.canonical or "-", v.address or "-", v.route_text) for v in verdicts]
        print_table(header, rows)
    # "Not routed" is an answer; only a name that does not parse is a usage error.
    return 1 if any(v.canonical is None for v in verdicts) else 0


def _verdict_json(verdict: Verdict) -> dict[str, Any]:
    return {
        "image": verdict.image,
        "canonical_name": verdict.canonical,
        "registry_address": verdict.address,
        "routed": verdict.error is None,
        "upstream": verdict.upstream,
        "kind": verdict.kind,
        "members": verdict.members,
        "mirrors": verdict.mirrors,
        "routes": verdict.routes,
        "proxy": verdict.proxy,
        "error": verdict.error,
    }
