"""The distribution API of hosted repositories: the push endpoints (pulls read the sets
through sets.py).

Push, as the OCI distribution spec has it:

- ``POST /v2/<name>/blobs/uploads/``: ``?digest=`` uploads monolithically (201);
  ``?mount=<digest>&from=<repo>`` links a blob of another repository of the same hosted
  set (201), or opens a session when it cannot (202); otherwise opens a session (202).
- ``PATCH <location>`` appends a chunk (``Content-Range: <start>-<end>`` must start where the
  upload ends; 416 with the current ``Range`` otherwise), ``GET <location>`` says how much
  arrived (204, ``Range``), ``PUT <location>?digest=`` finishes and verifies (201),
  ``DELETE <location>`` cancels (204).
- ``PUT /v2/<name>/manifests/<reference>``: 201 with ``Docker-Content-Digest`` and, for a
  manifest with a ``subject``, ``OCI-Subject``; ``DELETE`` of a tag or manifest: 202 when
  the hosted set allows deletes.

The shadowing guard (shadowing.py) is asked at the start of every upload and at every
manifest ``PUT``, whichever route the push took; a manifest ``PUT`` may copy in the blobs
it shares with an upstream member of the set's groups.

Every ``Location`` is written as the client addressed us: same route prefix, same name,
same ``ns``, so a client behind any routing dialect follows it back to the same place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from mirrorrouter.access.clientauth import Identity
from mirrorrouter.config.model import HostedSettings
from mirrorrouter.coordination import Coordinator, LocalCoordinator
from mirrorrouter.errors import ErrorCode, RegistryError, reference_error
from mirrorrouter.hosted.blobs import BlobFinder
from mirrorrouter.hosted.sets import HostedSets
from mirrorrouter.hosted.shadowing import Shadowing
from mirrorrouter.hosted.store import HostedStore
from mirrorrouter.hosted.uploads import Upload, upload_range
from mirrorrouter.manifests import MAX_MANIFEST_BYTES
from mirrorrouter.oci import (
    API_VERSION,
    API_VERSION_HEADER,
    CONTENT_DIGEST_HEADER,
    OciRequest,
    RequestKind,
)
from mirrorrouter.reference import Digest, ImageReference, InvalidReference

SUBJECT_HEADER = "OCI-Subject"
FORWARDED_HEADER = "X-Mirrorrouter-Forwarded"  # a request another replica passed on
FORWARD_TIMEOUT = httpx.Timeout(300.0, connect=5.0)  # a chunk may be large
# What a forwarded upload request carries along, and what of the answer comes back.
_FORWARDED_REQUEST = frozenset(
    {"host", "authorization", "content-type", "content-range", "content-length", "user-agent"}
)
_FORWARDED_ANSWER = frozenset(
    {
        "location",
        "range",
        "docker-upload-uuid",
        "docker-content-digest",
        "docker-distribution-api-version",
        "content-type",
        "www-authenticate",
        "x-upstream",
    }
)
UPLOAD_UUID_HEADER = "Docker-Upload-UUID"


class HostedApi:
    """Answers pushes (and their upload sessions) to hosted repository sets."""

    def __init__(
        self,
        sets: HostedSets,
        *,
        coordinator: Coordinator | None = None,
        peer_transport: httpx.AsyncBaseTransport | None = None,
        shadowing: Shadowing | None = None,
    ) -> None:
        """``coordinator`` names the replica holding an upload session; ``shadowing``
        guards pushes and supplies blobs to copy in; None: no guard (a configuration whose
        hosted sets are in no group needs none)."""
        self.sets = sets
        self.shadowing = shadowing
        self.coordinator: Coordinator = coordinator or LocalCoordinator()
        self._peer_transport = peer_transport
        self._peers: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._peers is not None:
            await self._peers.aclose()

    async def write(
        self,
        hosted: HostedSettings,
        ref: ImageReference,
        oci: OciRequest,
        request: Request,
        mount_from: str | None = None,
        identity: Identity | None = None,
    ) -> Response:
        """A push request (uploads, manifest PUT, DELETE) to a hosted repository, by
        ``identity``.

        ``mount_from`` is the repository (of this hosted set) a ``?mount=&from=`` names, as
        the caller routed it; None when it names none the client may read.
        """
        store = self.sets.store(hosted)
        guard = self.shadowing
        if oci.kind is RequestKind.UPLOAD:
            if guard is not None and oci.method == "POST" and oci.upload_id is None:
                await guard.check(hosted, ref.repository)  # before any layer travels
            return await self._upload(store, ref.repository, oci, request, mount_from)
        if oci.kind is RequestKind.MANIFEST and oci.method == "PUT":
            if guard is None:
                return await self._put_manifest(store, ref, oci, request, None)
            await guard.check(hosted, ref.repository, ref.tag)  # the decisive point
            sources = guard.copy_sources(hosted, ref.repository, identity)
            return await self._put_manifest(store, ref, oci, request, sources)
        if oci.kind is RequestKind.MANIFEST and oci.method == "DELETE":
            if not hosted.delete:
                raise RegistryError(
                    ErrorCode.UNSUPPORTED,
                    f"deleting is off for hosted {hosted.name} (set delete = true to allow it)",
                )
            await store.delete(ref.repository, ref.tag, ref.digest)
            return _empty(202)
        raise RegistryError(
            ErrorCode.UNSUPPORTED, f"{oci.method} of a {oci.kind.value} is not supported"
        )

    async def _upload(
        self,
        store: HostedStore,
        repository: str,
        oci: OciRequest,
        request: Request,
        mount_from: str | None,
    ) -> Response:
        if oci.upload_id is None:
            if oci.method != "POST":
                raise RegistryError(
                    ErrorCode.UNSUPPORTED, f"{oci.method} needs an upload session URL"
                )
            return await self._post(store, repository, oci, request, mount_from)
        try:
            upload = await store.upload(repository, oci.upload_id)
        except RegistryError as error:
            if error.code is not ErrorCode.BLOB_UPLOAD_UNKNOWN:
                raise
            forwarded = await self._forward(oci.upload_id, request)
            if forwarded is None:
                raise
            return forwarded
        if oci.method == "GET":
            return self._session(204, upload, oci)
        if oci.method == "PATCH":
            start = _content_range_start(request.headers.get("content-range"))
            upload = await store.append(upload, _body(request), start, _declared(request))
            await self.coordinator.put_upload(upload.id, store.settings.upload_ttl)
            return self._session(202, upload, oci)
        if oci.method == "PUT":
            digest = _digest_param(oci, required=True)
            assert digest is not None
            await store.finish(upload, digest, _body(request), _declared(request))
            return self._blob_created(oci, digest)
        if oci.method == "DELETE":
            await store.cancel(upload)
            return _empty(204)
        raise RegistryError(ErrorCode.UNSUPPORTED, f"{oci.method} of an upload is not supported")

    async def _post(
        self,
        store: HostedStore,
        repository: str,
        oci: OciRequest,
        request: Request,
        mount_from: str | None,
    ) -> Response:
        mount = oci.query_value("mount")
        if mount and mount_from:
            mounted = _parse_digest(mount)
            if await store.mount(repository, mounted, mount_from):
                return self._blob_created(oci, mounted)
        digest = _digest_param(oci, required=False)
        if digest is not None:
            await store.put_blob(repository, digest, _body(request), _declared(request))
            return self._blob_created(oci, digest)
        upload = await store.start_upload(repository)
        await self.coordinator.put_upload(upload.id, store.settings.upload_ttl)
        return self._session(202, upload, oci)

    async def _forward(self, upload_id: str, request: Request) -> Response | None:
        """Send a request for an upload session another replica holds to that replica, and
        its answer back; None when no other replica holds it (or this was forwarded)."""
        if FORWARDED_HEADER.lower() in request.headers:
            return None
        owner = await self.coordinator.upload_owner(upload_id)
        if owner is None or owner == self.coordinator.advertise_url:
            return None
        if self._peers is None:
            self._peers = httpx.AsyncClient(
                transport=self._peer_transport, timeout=FORWARD_TIMEOUT, trust_env=False
            )
        url = owner + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_REQUEST}
        headers[FORWARDED_HEADER] = "1"
        try:
            answer = await self._peers.request(
                request.method, url, headers=headers, content=_body(request)
            )
        except httpx.HTTPError as exc:
            raise RegistryError(
                ErrorCode.UNAVAILABLE,
                f"upload {upload_id} is held by another replica, which did not answer: {exc}",
            ) from exc
        kept = {k: v for k, v in answer.headers.items() if k.lower() in _FORWARDED_ANSWER}
        return Response(answer.content, answer.status_code, kept)

    async def _put_manifest(
        self,
        store: HostedStore,
        ref: ImageReference,
        oci: OciRequest,
        request: Request,
        copy_from: BlobFinder | None,
    ) -> Response:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_MANIFEST_BYTES:
                raise RegistryError(
                    ErrorCode.SIZE_INVALID,
                    f"manifests are limited to {MAX_MANIFEST_BYTES} bytes",
                    status=413,
                )
        pushed = await store.put_manifest(
            ref.repository,
            ref.tag,
            ref.digest,
            request.headers.get("content-type", ""),
            bytes(data),
            copy_from,
        )
        headers = {
            "Location": oci.client_url(f"manifests/{pushed.digest}"),
            CONTENT_DIGEST_HEADER: str(pushed.digest),
        }
        if pushed.subject is not None:
            headers[SUBJECT_HEADER] = str(pushed.subject)
        return _empty(201, headers)

    def _session(self, status: int, upload: Upload, oci: OciRequest) -> Response:
        return _empty(
            status,
            {
                "Location": oci.client_url(f"blobs/uploads/{upload.id}"),
                "Range": upload_range(upload.size),
                UPLOAD_UUID_HEADER: upload.id,
            },
        )

    def _blob_created(self, oci: OciRequest, digest: Digest) -> Response:
        return _empty(
            201, {"Location": oci.client_url(f"blobs/{digest}"), CONTENT_DIGEST_HEADER: str(digest)}
        )


def _empty(status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(
        b"", status, {API_VERSION_HEADER: API_VERSION, "Content-Length": "0", **(headers or {})}
    )


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body; a client that closes the connection mid-body is an answer of its
    own (499, logged without a traceback), and an upload keeps the bytes that arrived."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_INVALID,
            "the client closed the connection before the body ended; ask the upload URL "
            "where to resume",
            status=499,
        ) from None


def _declared(request: Request) -> int | None:
    """The body's ``Content-Length``, when the client said it (a limit may refuse it at
    once); None for a chunked body, which is measured as it streams."""
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _content_range_start(header: str | None) -> int | None:
    """The first byte of ``Content-Range: <start>-<end>`` (``bytes`` unit and ``/total``
    tolerated); None when absent (a streamed chunk appends where the upload ends)."""
    if not header:
        return None
    text = header.strip().removeprefix("bytes").strip().split("/", 1)[0]
    start, dash, end = text.partition("-")
    if not dash or not start.isdigit() or not end.isdigit() or int(end) < int(start):
        raise RegistryError(
            ErrorCode.BLOB_UPLOAD_INVALID,
            f"Content-Range {header!r} is not <start>-<end>",
            status=416,
        )
    return int(start)


def _digest_param(oci: OciRequest, *, required: bool) -> Digest | None:
    value = oci.query_value("digest")
    if not value:
        if required:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID, "finishing an upload needs ?digest=<algorithm>:<hex>"
            )
        return None
    return _parse_digest(value)


def _parse_digest(value: str) -> Digest:
    try:
        return Digest.parse(value)
    except InvalidReference as exc:
        raise reference_error(ErrorCode.DIGEST_INVALID, exc) from exc
