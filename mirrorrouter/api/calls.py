"""``Call``: one admitted request, as every handler past the door sees it."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

from mirrorrouter.access.clientauth import Identity
from mirrorrouter.mapping import Resolution
from mirrorrouter.oci import OciRequest


@dataclass(frozen=True, slots=True)
class Call:
    """One admitted request: what was asked, where it goes, who asks, from where."""

    oci: OciRequest
    resolution: Resolution
    identity: Identity | None
    client: str
    scope: Scope | None = None
