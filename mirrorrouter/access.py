"""Access decisions: may this client pull this repository? One place, asked by every path.

In order:

1. the gateway-wide ``[access] deny`` list (canonical names, globs): a match is refused;
2. the ``[access] allow`` list, when it is not empty: a name matching none is refused;
3. the upstream's ``[[upstreams."x".access]]`` rules: the first whose ``repositories`` match
   the repository decides who may pull; with no matching rule, anyone may.

A client that is anonymous where a rule wants a user gets 401 with a challenge (so
``docker login`` / ``podman login`` kicks in); a logged-in client that is not allowed gets
403 ``DENIED`` with a message an operator can act on. Rules belong to upstreams, not to
route names, so no route, ``ns`` or Host name reaches an upstream's content around them.
"""

from __future__ import annotations

from mirrorrouter.clientauth import ANONYMOUS, Identity
from mirrorrouter.config import Settings
from mirrorrouter.config.security import repository_matches
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.mapping import Resolution


class AccessPolicy:
    """The access rules of one configuration."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(self, identity: Identity | None, resolution: Resolution) -> None:
        """Return when ``identity`` may pull the resolved repository; raise otherwise."""
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
        repository = resolution.reference.repository
        for rule in resolution.upstream.access:
            if repository_matches(rule.repositories, repository):
                if permits(rule.pull, identity or ANONYMOUS):
                    return
                if identity is None or identity.user is None:
                    raise RegistryError(
                        ErrorCode.UNAUTHORIZED, f"log in to pull {name} through this mirror"
                    )
                raise RegistryError(
                    ErrorCode.DENIED,
                    f"user {identity.user} may not pull {name} "
                    f"(allowed: {', '.join(sorted(rule.pull))})",
                )


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
