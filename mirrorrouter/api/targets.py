"""What an upstream (through the pull-through) or a hosted set answers a call, in typed
values (served.py): the one way the endpoints and the groups ask a target for content.

A target answers only GET and HEAD here (pushes go to ``HostedApi.write``); an upstream's
cached blob may come with a ``location`` to fetch it from object storage instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from mirrorrouter.api.calls import Call
from mirrorrouter.config import UpstreamSettings
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.errors import ErrorCode, RegistryError
from mirrorrouter.hosted.sets import HostedSets
from mirrorrouter.manifests import referrers_index
from mirrorrouter.mapping import Resolution
from mirrorrouter.oci import CacheResult
from mirrorrouter.pull.pullthrough import Pullthrough
from mirrorrouter.served import BlobAnswer, ManifestAnswer, Memory, Referrers, TagList


class Targets:
    """Asks the upstream or hosted set a call resolved to."""

    def __init__(self, pull: Pullthrough, hosted: HostedSets) -> None:
        self.pull = pull
        self.hosted = hosted

    def remembered(
        self, resolution: Resolution, accept: tuple[str, ...]
    ) -> ManifestAnswer | Literal[Memory.MISSING] | None:
        """What memory alone says of an upstream's or a hosted set's manifest (None: the full
        path must decide)."""
        target, ref = resolution.target, resolution.reference
        if isinstance(target, HostedSettings):
            return self.hosted.memory_manifest(target, ref, accept)
        assert isinstance(target, UpstreamSettings)
        return self.pull.remembered(target, ref, accept)

    async def manifest(self, call: Call) -> ManifestAnswer:
        """The manifest in a form the client accepts."""
        hosted = _readable(call)
        ref, accept = call.resolution.reference, call.oci.accept
        if hosted is None:
            return await self.pull.manifest_for_client(call.resolution.upstream, ref, accept)
        stored = await self.hosted.manifest(hosted, ref, accept)
        return ManifestAnswer(stored, CacheResult.HOSTED, hosted.name)

    async def blob(self, call: Call) -> BlobAnswer:
        """A blob, or where a cached one may be fetched instead (``location``)."""
        hosted = _readable(call)
        ref = call.resolution.reference
        if hosted is not None:
            blob = await self.hosted.blob(hosted, ref)
            return BlobAnswer(
                blob.size, CacheResult.HOSTED, hosted.name, blob.stream, file=blob.file
            )
        digest = ref.digest
        assert digest is not None
        upstream = call.resolution.upstream
        get = call.oci.method == "GET"
        answer = await self.pull.blob(upstream, ref.repository, digest, body=get)
        if answer.cache == CacheResult.HIT and get:
            url = await self.pull.blob_redirect(upstream, digest)
            if url is not None:
                return replace(answer, location=url)
        return answer

    async def tags(self, call: Call) -> TagList:
        """A hosted repository's tags, or the upstream's page (``n``, ``last`` passed on)."""
        hosted = _readable(call)
        ref = call.resolution.reference
        if hosted is not None:
            return TagList(tuple(await self.hosted.tags(hosted, ref)))
        upstream = call.resolution.upstream
        query = {k: v for k, v in call.oci.query if k in ("n", "last")}
        page = await self.pull.tags(upstream, ref.repository, query)
        return TagList(upstream=upstream.name, page=page.data, link=page.headers.get("link"))

    async def referrers(self, call: Call) -> Referrers:
        """The referrers of the digest, filtered by ``artifactType`` when asked."""
        hosted = _readable(call)
        ref = call.resolution.reference
        artifact_type = call.oci.query_value("artifactType")
        if hosted is not None:
            listed = tuple(await self.hosted.referrers(hosted, ref, artifact_type))
            return Referrers(referrers_index(listed), bool(artifact_type), listed)
        upstream = call.resolution.upstream
        index, filtered = await self.pull.referrers(upstream, ref, artifact_type)
        return Referrers(index, filtered, upstream=upstream.name)


def _readable(call: Call) -> HostedSettings | None:
    """The hosted set the call reads (None: an upstream); only GET and HEAD read."""
    if call.oci.method not in ("GET", "HEAD"):
        raise RegistryError(ErrorCode.UNSUPPORTED, f"{call.oci.method} is not supported here")
    target = call.resolution.target
    return target if isinstance(target, HostedSettings) else None
