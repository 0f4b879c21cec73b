"""Coordination among replicas: fill locks, shared negative and tag caches, circuit state.

mirrorrouter may run as N stateless replicas behind a load balancer, sharing one object
store (the cache) and one Redis for coordination. ``Coordinator`` is what the rest sees:

- **fill locks**: ``claim(upstream, digest)`` takes the cluster-wide lock on one blob's
  download (a ``Lease``), or returns None while another replica holds it; ``holder`` names
  that replica's ``advertise_url`` so followers stream the download from it (fill.py);
- **tag leases**: ``claim_tag(upstream, repository, tag)``, the same kind of lock on asking
  upstream about one tag: the holder asks and shares the answer (the tag record below, the
  manifest in the shared store), the others wait for it (pullthrough.py);
- **shared negative cache**: an upstream "not found" per (upstream, repository, reference),
  for the upstream's ``negative_ttl``;
- **shared tag checks**: the last upstream confirmation of a tag, so a tag checked through
  one replica is fresh on every replica within ``tag_ttl``, with no upstream request;
- **shared circuits**: a mirror's consecutive failures and open window, so one replica's
  failures open the circuit for all (``circuit``, consulted by breaker.py);
- **housekeeping chores**: ``claim_chore`` takes the cluster-wide lease on a chore that one
  replica at a time runs (a hosted set's scheduled garbage collection), and the chore's
  record (``chore_record``, when it last ran and what it did) is kept for all to read.
- **hosted generations**: a counter per hosted set that every push bumps, so memory
  answers for the set stay certain on every replica (generation.py).

``LocalCoordinator`` is one replica on its own (the default): fill locks in memory, nothing
else shared (the site's memory caches and the local breakers are the whole truth).
``RedisCoordinator`` (redisbacked.py) keeps everything in Redis. Its keys (``P`` is
``key_prefix``, ``U`` the upstream's name, ``R`` a repository)::

    P:fill:U@<digest>              "<token> <advertise_url>"  PX lock_ttl, renewed every
                                                              lock_ttl/3 by the holder
    P:resolve:U/R:<tag>            "<token> <advertise_url>"  the same, for a tag lease
    P:tag:U/R:<tag>                JSON tag record            PX what is left of tag_ttl
    P:notfound:U/R:<reference>     JSON error                 PX negative_ttl
    P:circuit:U:<mirror>:failures  consecutive failures       PX FAILURE_WINDOW (INCR)
    P:circuit:U:<mirror>:open      "1"                        PX the breaker's cooldown
    P:upload:<id>                  the holder's advertise_url PX the hosted set's gc_grace
    P:chore:<chore>                "<token> <advertise_url>"  PX lock_ttl, renewed (a lease)
    P:chore:<chore>:record         JSON, the chore's last run PX what the chore asks
    P:generation:<hosted set>      a counter (INCR; created   no expiry
                                   at a random value)

A lock is released by compare-and-delete (a Lua script), so a replica never deletes a lock
it no longer holds; a holder that dies stops renewing and its lock expires after lock_ttl.

**Redis never fails a pull.** Every Redis error (down, timeout, a bad answer) is logged as a
warning once per outage and the operation falls back to local behaviour (fail open): a
claim is granted by the local lock table, lookups miss, writes are dropped, and Redis is
not asked again for ``OUTAGE_BACKOFF`` seconds. At worst two replicas fetch one blob or
revalidate one tag each; nothing is served that was not verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mirrorrouter.config.model import CoordinationSettings
from mirrorrouter.coordination.base import Coordinator, Holder, Lease, SharedCircuit
from mirrorrouter.coordination.local import LocalCoordinator


def open_coordinator(
    settings: CoordinationSettings, *, clock: Callable[[], float] = time.monotonic
) -> Coordinator:
    """The coordinator the settings name (``backend`` "local" or "redis")."""
    if settings.backend == "redis":
        # Imported here: only a deployment with Redis loads the redis client.
        from mirrorrouter.coordination.redisbacked import RedisCoordinator

        return RedisCoordinator(settings, clock=clock)
    if settings.backend == "local":
        return LocalCoordinator(settings)
    raise ValueError(f"unknown coordination backend {settings.backend!r}")


__all__ = [
    "Coordinator",
    "Holder",
    "Lease",
    "LocalCoordinator",
    "SharedCircuit",
    "open_coordinator",
]
