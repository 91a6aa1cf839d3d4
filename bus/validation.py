"""Decoding untrusted JSON into typed requests, with errors that name the offending field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from bus.errors import InvalidRequest

T = TypeVar("T")
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")


def decode_json(data: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body, turning any failure into an ``InvalidRequest`` naming the field."""
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = _UNKNOWN_FIELD.search(text)
        path = _PATH.search(text)
        if unknown:
            name = unknown.group(1)
            prefix = path.group(1) if path and path.group(1) else ""
            param = f"{prefix}.{name}" if prefix else name
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param) from None
        param = path.group(1) if path and path.group(1) else None
        message = _PATH.sub("", text)
        raise InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param) from None
    except msgspec.DecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
