"""Reading upstream bodies with a bound: memory stays flat whatever an upstream sends.

Every body read whole from an upstream goes through ``read_capped``: error bodies
(``ERROR_BODY_LIMIT``, plenty for an OCI error document), manifests (4 MiB, oci.py), tag
lists and referrers (``max_list_bytes``), token answers (auth.py). A declared
``Content-Length`` over the cap is refused before a byte is read; otherwise reading stops
at the first chunk past the cap and the caller closes the connection, so a 600 MB answer
costs about one chunk of memory.

Bodies are read as sent (``aiter_raw``). Requests say ``Accept-Encoding: identity``; an
answer compressed anyway is refused rather than decompressed, because one megabyte of gzip
can inflate to a gigabyte inside a single chunk, before any cap is looked at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from mirrorrouter.sizes import format_limit

ERROR_BODY_LIMIT = 64 * 1024


class BodyRefused(Exception):
    """An upstream body that is too large, or compressed although nobody asked."""


def encoding_of(response: httpx.Response) -> str | None:
    """The body's Content-Encoding; None for none (or ``identity``)."""
    value = response.headers.get("content-encoding", "").strip().lower()
    return None if value in ("", "identity") else value


async def raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body as sent, in the pieces the transport delivers."""
    try:
        content = response.content  # read already: a response made from bytes (tests)
    except httpx.ResponseNotRead:
        async for chunk in response.aiter_raw():
            yield chunk
        return
    if content:
        yield content


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The whole body of ``response`` if it is at most ``limit`` bytes; else BodyRefused.

    The caller closes the response (a refused body is left unread).
    """
    declared = response.headers.get("content-length", "").strip()
    if declared.isdecimal() and int(declared) > limit:
        raise BodyRefused(f"of {declared} bytes is over the {format_limit(limit)} limit")
    encoding = encoding_of(response)
    if encoding is not None:
        raise BodyRefused(f"is compressed ({encoding}), which was not asked for")
    data = bytearray()
    async for chunk in raw_chunks(response):
        data += chunk
        if len(data) > limit:
            raise BodyRefused(f"is over the {format_limit(limit)} limit")
    return bytes(data)


async def drain(response: httpx.Response) -> bytes:
    """Read a small body whose content hardly matters (an error, a redirect, a challenge)
    and close the response: ``b""`` when it is large, compressed or broken.

    Reading a small body whole leaves its connection reusable; a large one is not read.
    """
    try:
        return await read_capped(response, ERROR_BODY_LIMIT)
    except (BodyRefused, httpx.HTTPError, httpx.StreamError):
        return b""
    finally:
        await response.aclose()
