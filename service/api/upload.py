"""Reading a request's body: an uploaded image (the multipart field `file`, or the raw body with an
image/* Content-Type), or any body (the v2 protocol's). STEPNET_MAX_UPLOAD_BYTES is enforced from
Content-Length before anything is read, and again while streaming (a chunked body has no length),
so an oversized body is never read whole.

Bodies are taken as sent: a Content-Encoding other than identity is refused (415) rather than
ignored, since images are compressed already and a decompressed size is one more limit to keep.
A client that leaves mid-body raises starlette's ClientDisconnect (a 499 in service.core.errors)."""

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.core.errors import (BadRequest, EmptyBody, MissingFile, PayloadTooLarge,
                            UnsupportedMediaType)

FIELD = "file"

# /docs: the two ways to send an image (the handler reads the body itself, to bound it)
REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": [FIELD],
        "properties": {FIELD: {"type": "string", "format": "binary",
                               "description": "the image: PNG, JPEG, WebP, GIF, BMP or TIFF"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


def media_type(request: Request) -> str:
    """The Content-Type without parameters, lower case; "" when there is none."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_media_type(request: Request, allowed: tuple[str, ...]) -> None:
    """Refuse (415) a body whose Content-Type is not one of `allowed` ("" for none)."""
    if media_type(request) not in allowed:
        shown = " or ".join(a or "none" for a in allowed)
        raise UnsupportedMediaType(f"Content-Type {request.headers['content-type']!r} is not "
                                   f"supported here; send {shown}")


async def read_image(request: Request, max_bytes: int) -> bytes:
    kind = media_type(request)
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise UnsupportedMediaType(f"Content-Type {kind or '(none)'} is not supported: send the "
                                   f"image as multipart field '{FIELD}' or as the raw body with an "
                                   f"image/* Content-Type")
    if kind == "multipart/form-data":
        _check_headers(request, max_bytes)
        data = await _multipart_file(request, _bounded(request, max_bytes), max_bytes)
    else:
        data = await read_body(request, max_bytes)
    if not data:
        raise EmptyBody("the image is empty")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (413) as soon as it is known to exceed max_bytes."""
    _check_headers(request, max_bytes)
    return b"".join([chunk async for chunk in _bounded(request, max_bytes)])


def _check_headers(request: Request, max_bytes: int) -> None:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported; send the body "
                                   f"uncompressed")
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise PayloadTooLarge(f"the body is {length} bytes; the limit is {max_bytes} "
                              f"(STEPNET_MAX_UPLOAD_BYTES)")


async def _bounded(request: Request, max_bytes: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes "
                                  f"(STEPNET_MAX_UPLOAD_BYTES)")
        yield chunk


async def _multipart_file(request: Request, stream: AsyncGenerator[bytes, None], max_bytes: int) -> bytes:
    parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=16)
    parser.spool_max_size = max_bytes          # the body is bounded already: keep it in memory
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    upload = form.get(FIELD)
    if not isinstance(upload, UploadFile):
        raise MissingFile(f"the multipart body has no file field '{FIELD}'")
    try:
        return await upload.read()
    finally:
        await form.close()
