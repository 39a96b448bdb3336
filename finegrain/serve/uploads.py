"""One uploaded photo out of a request body, in memory: multipart form data or the raw image bytes.

Starlette's own form parser spools files over 1 MB to a temporary file; a request here writes nothing to disk, so
the body is read with a byte limit and multipart is parsed with python-multipart's push parser.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header

ACCEPTED = "multipart/form-data with one file, or the image bytes as image/* or application/octet-stream"


class UploadError(Exception):
    """A request whose body is no usable upload; `status` is the HTTP status that answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    data: bytes
    content_type: str  # as the client declared it ("" when it did not)
    filename: str | None = None


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise UploadError(413, f"upload of {int(content_length):,} bytes is over the limit of {limit:,} bytes; "
                               "send a smaller photo or start the server with a larger --max-upload-mb")  # fmt: skip
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise UploadError(413, f"upload is over the limit of {limit:,} bytes; send a smaller photo or start "
                                   "the server with a larger --max-upload-mb")  # fmt: skip
    return bytes(body)


def extract_upload(body: bytes, content_type: str) -> Upload:
    """The one photo of a request: the file part of a multipart form, or the body itself."""
    media_type, params = parse_options_header(content_type)
    media_type = media_type.decode("latin-1").lower()
    if media_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise UploadError(400, "multipart body without a boundary; let the HTTP client build the form")
        files = [part for part in _parts(body, boundary) if part.filename is not None]
        if len(files) != 1:
            raise UploadError(400, f"the form holds {len(files)} files; send exactly one photo per request")
        upload = files[0]
    elif media_type.startswith("image/") or media_type == "application/octet-stream":
        upload = Upload(body, media_type)
    else:
        raise UploadError(415, f"unsupported content type {media_type or '(none)'!r}; send {ACCEPTED}")
    declared = upload.content_type
    if declared and not (declared.startswith("image/") or declared == "application/octet-stream"):
        raise UploadError(415, f"unsupported type {declared!r}: not a photo; send a JPEG, PNG, WebP or HEIC image")
    if not upload.data:
        raise UploadError(400, "empty upload: the photo has no bytes; choose the file again")
    return upload


def _parts(body: bytes, boundary: bytes) -> list[Upload]:
    """Every part of a multipart body, data kept in memory; fields have filename None."""
    parts: list[Upload] = []
    headers: dict[str, str] = {}
    field, value, data = bytearray(), bytearray(), bytearray()

    def header_end() -> None:
        headers[field.decode("latin-1").lower()] = value.decode("latin-1")  # bytes kept: names are UTF-8
        field.clear()
        value.clear()

    def part_end() -> None:
        _, disposition = parse_options_header(headers.get("content-disposition", ""))
        filename = disposition.get(b"filename")
        content_type = parse_options_header(headers.get("content-type", ""))[0].decode("latin-1").lower()
        name = None if filename is None else filename.decode("utf-8", "replace")
        parts.append(Upload(bytes(data), content_type, name))
        headers.clear()
        data.clear()

    callbacks = {
        "on_header_field": lambda buffer, start, end: field.extend(buffer[start:end]),
        "on_header_value": lambda buffer, start, end: value.extend(buffer[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda buffer, start, end: data.extend(buffer[start:end]),
        "on_part_end": part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types for a malformed body
        raise UploadError(400, f"malformed multipart body ({e}); let the HTTP client build the form") from e
    return parts
