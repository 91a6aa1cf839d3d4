"""Multipart form bodies (audio uploads, image edits): text fields and files, every part bounded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError  # a part's headers that do not parse

from bus.errors import InvalidRequest, PayloadTooLarge
from bus.openai.decoding import invalid

T = TypeVar("T")
_MAX_PARTS = 64  # more fields than any endpoint has: a body of empty parts is refused early
_MAX_FIELD_BYTES = 64 * 1024  # a text field (a prompt, say); files are bounded by the body limit


@dataclass(frozen=True)
class Upload:
    """One file part of a form."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    """A multipart body: text fields (a ``name[]`` field may repeat) and files, by field name."""

    fields: dict[str, str | list[str]] = field(default_factory=dict)
    files: dict[str, list[Upload]] = field(default_factory=dict)

    def file(self, name: str) -> Upload:
        """The one file sent as ``name``, or a 400 naming it."""
        uploads = self.files.get(name)
        if not uploads:
            raise InvalidRequest(f"Missing required parameter: '{name}' (a file)", param=name)
        if len(uploads) > 1:
            raise InvalidRequest(f"'{name}' takes one file, got {len(uploads)}", param=name)
        return uploads[0]

    def convert(self, type_: type[T]) -> T:
        """The text fields as ``type_`` (strings converted to its field types), or a 400 naming the field."""
        try:
            return msgspec.convert(self.fields, type_, strict=False)
        except msgspec.ValidationError as exc:
            raise invalid(str(exc)) from None


def takes_form(handler: T) -> T:
    """Mark a route whose body is a multipart form: ``edge.errors.check_body`` lets such a body through
    to it, and refuses it on the JSON routes."""
    handler.takes_form = True
    return handler


def route_takes_form(request: web.Request) -> bool:
    """Whether the route ``request`` was matched to reads a multipart form (``takes_form``)."""
    return getattr(request.match_info.handler, "takes_form", False)


async def read_form(request: web.Request, file_fields: frozenset[str]) -> Form:
    """Read a ``multipart/form-data`` body: parts named in ``file_fields`` as files, the rest as text.

    The whole body is bounded by the app's ``client_max_size`` (413), as a JSON body is.
    """
    if request.content_type != "multipart/form-data":
        raise InvalidRequest("This endpoint takes a multipart/form-data body "
                             f"(got {request.content_type or 'none'}).")
    limit = request.client_max_size
    try:
        reader = await request.multipart()
        form, total, parts = Form(), 0, 0
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > _MAX_PARTS:
                raise InvalidRequest(f"The form has more than {_MAX_PARTS} parts.")
            if not isinstance(part, BodyPartReader) or not part.name:  # a nested multipart is not a field
                raise InvalidRequest("Every part of the form must be a named field.")
            name = part.name
            field_limit = None if name in file_fields else _MAX_FIELD_BYTES
            data = await _read_bounded(part, limit - total, field_limit, limit)
            total += len(data)
            if name in file_fields:
                upload = Upload(part.filename or "", part.headers.get("Content-Type", ""), data)
                form.files.setdefault(name, []).append(upload)
                continue
            try:
                text = data.decode()
            except UnicodeDecodeError:
                raise InvalidRequest(f"'{name}' is not valid UTF-8 text", param=name) from None
            if name.endswith("[]"):
                listed = form.fields.setdefault(name[:-2], [])
                if not isinstance(listed, list):
                    raise InvalidRequest(f"'{name[:-2]}' is given twice", param=name[:-2])
                listed.append(text)
            elif name in form.fields:
                raise InvalidRequest(f"'{name}' is given twice", param=name)
            else:
                form.fields[name] = text
        return form
    except (ValueError, AssertionError, KeyError, HttpProcessingError) as exc:  # aiohttp's word for a malformed body
        raise InvalidRequest(f"The multipart body could not be read: {exc}") from None


async def _read_bounded(part: BodyPartReader, remaining: int, field_limit: int | None, limit: int) -> bytes:
    """A part's bytes: a 413 past what is left of the body limit, a 400 past a text field's limit."""
    chunks, size = [], 0
    while chunk := await part.read_chunk(64 * 1024):
        size += len(chunk)
        if field_limit is not None and size > field_limit:
            raise InvalidRequest(f"'{part.name}' is longer than {field_limit} bytes", param=part.name)
        if size > remaining:
            raise PayloadTooLarge(f"The request body exceeds the {limit} byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)
