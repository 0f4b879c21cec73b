"""A small in-process registry for unit tests: content from dicts, faults on demand.

It answers the pull API (manifests, blobs with Range, tags with pagination, referrers),
can demand Docker-Hub-style Bearer tokens or Basic auth, counts every request, and can be
told to misbehave (status codes, corrupt bytes, redirects to another host).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    """A stored image: its manifest bytes and media type, and its blobs."""

    repository: str
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(repository: str, layers: list[bytes], *, with_media_type: bool = True) -> Image:
    """An OCI image with the given layer contents (config is derived)."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
    ).encode()
    document: dict[str, Any] = {"schemaVersion": 2}
    if with_media_type:
        document["mediaType"] = OCI_MANIFEST
    document["config"] = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": sha256(config),
        "size": len(config),
    }
    document["layers"] = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(b), "size": len(b)}
        for b in layers
    ]
    blobs = {sha256(config): config, **{sha256(b): b for b in layers}}
    return Image(repository, json.dumps(document).encode(), OCI_MANIFEST, blobs)


@dataclass
class FakeRegistry:
    """The registry's state; ``app`` serves it."""

    host: str = "upstream.test"
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range) when one came
    faults: dict[str, list[int]] = field(default_factory=dict)  # path fragment -> statuses
    corrupt: set[str] = field(default_factory=set)  # digests served with a flipped byte
    redirect_blobs_to: str | None = None  # e.g. "http://cdn.test" (another host)
    bearer: bool = False
    basic: tuple[str, str] | None = None
    users: dict[str, str] = field(default_factory=dict)  # token realm credentials
    private_prefix: str = "private/"
    supports_referrers: bool = False
    referrers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    token_get_allowed: bool = True  # False: the realm only speaks the OAuth2 POST form
    gate: asyncio.Event | None = None  # when set, every answer waits for it (overlap tests)
    seen_authorization: list[tuple[str, str]] = field(default_factory=list)

    def add(self, image: Image, *tags: str) -> Image:
        for ref in (image.digest, *tags):
            self.manifests[(image.repository, ref)] = (image.manifest, image.media_type)
        for digest, data in image.blobs.items():
            self.blobs[(image.repository, digest)] = data
        return image

    def add_index(self, repository: str, children: list[Image], *tags: str) -> str:
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": len(child.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for child, arch in zip(children, ["amd64", "arm64", "s390x"], strict=False)
            ],
        }
        data = json.dumps(document).encode()
        for child in children:
            self.add(child)
        for ref in (sha256(data), *tags):
            self.manifests[(repository, ref)] = (data, OCI_INDEX)
        return sha256(data)

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    def counts(self) -> Counter[str]:
        return Counter(f"{m} {p}" for m, p in self.requests)

    # ------------------------------------------------------------------ app

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/token", self._token, methods=["GET", "POST"]),
                Route("/{path:path}", self._serve, methods=["GET", "HEAD"]),
            ]
        )

    async def _token(self, request: Request) -> Response:
        if request.method == "POST":
            params = dict(parse_qsl((await request.body()).decode()))
            user = params.get("username")
            ok = user is not None and self.users.get(user) == params.get("password")
        else:
            if not self.token_get_allowed:
                self.token_requests.append({"method": "GET"})
                return Response(b"", 405)
            params = dict(request.query_params)
            user, ok = self._basic_user(request)
        self.token_requests.append({"method": request.method, "user": user or "", **params})
        if user is not None and not ok:
            return JSONResponse({"details": "bad credentials"}, 401)
        scope = params.get("scope", "")
        repository = scope.split(":")[1] if scope.count(":") >= 2 else ""
        allowed = user is not None or not repository.startswith(self.private_prefix)
        token = f"tok-{user or 'anon'}-{repository if allowed else 'none'}"
        return JSONResponse({"token": token, "expires_in": 300})

    def _basic_user(self, request: Request) -> tuple[str | None, bool]:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None, False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, self.users.get(user) == password

    def _authorized(self, request: Request, repository: str) -> Response | None:
        header = request.headers.get("authorization", "")
        self.seen_authorization.append((request.url.netloc, header))
        if self.basic is not None:
            expected = "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
            if header != expected:
                return Response(b"", 401, {"WWW-Authenticate": 'Basic realm="fake"'})
        if self.bearer:
            allowed = header in (f"Bearer tok-{u}-{repository}" for u in [*self.users, "anon"])
            if header.startswith("Bearer tok-anon-") and repository.startswith(self.private_prefix):
                allowed = False
            if not allowed:
                challenge = (
                    f'Bearer realm="http://{self.host}/token",service="fake",'
                    f'scope="repository:{repository}:pull"'
                )
                return Response(b"", 401, {"WWW-Authenticate": challenge})
        return None

    async def _serve(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        self.requests.append((request.method, path))
        if "range" in request.headers:
            self.ranges.append((path, request.headers["range"]))
        if self.gate is not None:
            await self.gate.wait()
        for fragment, statuses in self.faults.items():
            if fragment in path and statuses:
                status = statuses.pop(0)
                return Response(b"{}", status, {"Retry-After": "7"} if status == 429 else {})
        if path in ("/v2/", "/v2"):
            return JSONResponse({})
        for keyword in ("/manifests/", "/blobs/", "/tags/", "/referrers/"):
            index = path.rfind(keyword)
            if index > 0:
                repository, rest = path[4:index], path[index + len(keyword) :]
                denied = self._authorized(request, repository)
                if denied is not None:
                    return denied
                return self._answer(request, keyword, repository, rest)
        return Response(b"", 404)

    def _answer(self, request: Request, keyword: str, repository: str, rest: str) -> Response:
        head = request.method == "HEAD"
        if keyword == "/manifests/":
            found = self.manifests.get((repository, rest))
            if found is None:
                return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, 404)
            data, media_type = found
            headers = {"Docker-Content-Digest": sha256(data), "Content-Length": str(len(data))}
            return Response(b"" if head else data, 200, headers, media_type=media_type)
        if keyword == "/blobs/":
            if self.redirect_blobs_to and request.url.netloc == self.host:
                return Response(
                    b"", 307, {"Location": f"{self.redirect_blobs_to}/v2/{repository}/blobs/{rest}"}
                )
            data = self.blobs.get((repository, rest))
            if data is None:
                return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN"}]}, 404)
            if rest in self.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            range_header = request.headers.get("range")
            if range_header:
                start_text, _, end_text = range_header.removeprefix("bytes=").partition("-")
                start = int(start_text)
                end = int(end_text) + 1 if end_text else len(data)
                headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
                return Response(b"" if head else data[start:end], 206, headers)
            return Response(b"" if head else data, 200, {"Content-Length": str(len(data))})
        if keyword == "/tags/":
            tags = sorted(
                ref for (repo, ref) in self.manifests if repo == repository and ":" not in ref
            )
            if not tags:
                return JSONResponse({"errors": [{"code": "NAME_UNKNOWN"}]}, 404)
            last = request.query_params.get("last")
            if last:
                tags = [t for t in tags if t > last]
            headers = {}
            n = request.query_params.get("n")
            if n is not None and len(tags) > int(n):
                tags = tags[: int(n)]
                headers["Link"] = f'</v2/{repository}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
            return JSONResponse({"name": repository, "tags": tags}, headers=headers)
        if not self.supports_referrers:
            return JSONResponse({"errors": [{"code": "UNSUPPORTED"}]}, 404)
        manifests = self.referrers.get(rest, [])
        return JSONResponse(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
            media_type=OCI_INDEX,
        )
