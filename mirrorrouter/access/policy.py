"""Access decisions: may this client pull (or push) this repository? One place, asked by
every path.

In order:

1. the gateway-wide ``[access] deny`` list (canonical names, globs): a match is refused;
2. the ``[access] allow`` list, when it is not empty: a name matching none is refused;
3. the target's rules (``[[upstreams."x".access]]``, ``[[hosted."x".access]]``): the first
   whose ``repositories`` match the repository decides who may pull, and for a hosted set
   who may push (and delete). With no matching rule anyone may pull; pushing to a hosted set
   is then open to everyone while ``[auth]`` is off (a laptop, a Kind cluster), and to
   nobody once it is on: with logins, only a rule grants a push (a hosted set placed before
   docker.io in a group would otherwise let any user replace what everyone pulls).
   Nothing may be pushed to an upstream (a cache); a group is checked member by member.

The monitoring surfaces (the status page, ``/metrics``) follow ``auth.monitoring``; they are
public while ``[auth]`` is off.

A client that is anonymous where a rule wants a user gets 401 with a challenge (so
``docker login`` / ``podman login`` kicks in); a logged-in client that is not allowed gets
403 ``DENIED`` with a message an operator can act on. Rules belong to upstreams, not to
route names, so no route, ``ns`` or Host name reaches an upstream's content around them.
"""

from __future__ import annotations

from typing import NoReturn

from mirrorrouter.access.clientauth import ANONYMOUS, Identity
from mirrorrouter.config import Settings
from mirrorrouter.config.model import GroupSettings, HostedSettings
from mirrorrouter.config.security import repository_matches
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Resolution


class AccessPolicy:
    """The access rules of one configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(
        self, identity: Identity | None, resolution: Resolution, *, push: bool = False
    ) -> None:
        """Return when ``identity`` may pull (``push``: push) the resolved repository; raise
        otherwise."""
        target = resolution.target
        if isinstance(target, GroupSettings):
            return  # each member is checked when the group asks it
        name = resolution.reference.name
        access = self.settings.access
        for pattern in access.deny:
            if repository_matches((pattern,), name):
                raise RegistryError(
                    ErrorCode.DENIED, f"{name} is denied on this mirror (access.deny {pattern!r})"
                )
        if access.allow and not repository_matches(access.allow, name):
            raise RegistryError(
                ErrorCode.DENIED, f"{name} is not in this mirror's access.allow list"
            )
        action = "push" if push else "pull"
        if push and not isinstance(target, HostedSettings):
            raise RegistryError(
                ErrorCode.UNSUPPORTED,
                f"{name} is a pull-through cache of {target.name}: push to a hosted repository",
            )
        repository = resolution.reference.repository
        rule = next(
            (r for r in target.access if repository_matches(r.repositories, repository)), None
        )
        if rule is not None:
            allowed = rule.push if push else rule.pull
        elif push:
            # With logins, only a rule grants a push; without them (a laptop, Kind) anyone.
            allowed = frozenset() if self.settings.auth else frozenset({"anonymous"})
        else:
            return
        if permits(allowed, identity or ANONYMOUS):
            return
        if rule is None:
            because = f'no [[hosted."{target.name}".access]] rule grants push to {repository}'
        else:
            because = f"allowed: {', '.join(sorted(allowed)) or 'nobody'}"
        _refuse(identity, f"{action} {name}", because)

    def may_pull(self, identity: Identity | None, resolution: Resolution) -> bool:
        """Whether ``identity`` may pull the resolved repository (the status page asks)."""
        try:
            self.check(identity, resolution)
        except RegistryError:
            return False
        return True

    def check_monitoring(self, identity: Identity | None, surface: str) -> None:
        """Return when ``identity`` may see ``surface`` (the status page, /metrics); raise
        otherwise. Public while ``[auth]`` is off."""
        auth = self.settings.auth
        if auth is None or permits(auth.monitoring, identity or ANONYMOUS):
            return
        _refuse(
            identity, f"see {surface}", f"auth.monitoring: {', '.join(sorted(auth.monitoring))}"
        )


def _refuse(identity: Identity | None, what: str, because: str) -> NoReturn:
    """401 for an anonymous client (so it logs in), 403 ``DENIED`` for a user."""
    if identity is None or identity.user is None:
        raise RegistryError(ErrorCode.UNAUTHORIZED, f"log in to {what} on this mirror")
    raise RegistryError(ErrorCode.DENIED, f"user {identity.user} may not {what} ({because})")


def nobody_may_push(settings: Settings) -> list[HostedSettings]:
    """Hosted sets no client may push to: no rule grants push, and pushes without a rule
    are closed (``[auth]`` is on) or a catch-all rule grants none. ``check-config`` warns."""
    closed = []
    for hosted in settings.hosted.values():
        if any(rule.push for rule in hosted.access):
            continue
        catch_all = any("*" in rule.repositories for rule in hosted.access)
        if settings.auth is not None or catch_all:
            closed.append(hosted)
    return closed


def permits(principals: frozenset[str], identity: Identity) -> bool:
    """Whether any principal covers the identity."""
    if "anonymous" in principals:
        return True
    if identity.user is None:
        return False
    return (
        "authenticated" in principals
        or identity.user in principals
        or any(f"group:{group}" in principals for group in identity.groups)
    )
