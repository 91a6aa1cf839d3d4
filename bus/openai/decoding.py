"""Decoding untrusted JSON into typed requests, with errors that name the offending field."""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from bus.errors import InvalidRequest

T = TypeVar("T")
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")
# 19 digits or more: the only integers that may not fit in 64 bits. Searching the raw bytes is
# cheap, so the exact check (a walk of the decoded value) runs only for bodies that have one.
_LONG_DIGITS = re.compile(rb"\d{19}")
_INT64 = range(-(2**63), 2**63)


def decode_json(data: bytes, type_: type[T]) -> T:
    """Decode and validate a JSON body, turning any failure into an ``InvalidRequest`` naming the field."""
    try:
        value = msgspec.json.decode(data, type=type_)
        if _LONG_DIGITS.search(data):
            _check_int64(value)
        return value
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None
    except msgspec.DecodeError:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for bad bytes inside a string
        raise InvalidRequest("The JSON body of your request is not valid UTF-8.") from None
    except RecursionError:
        raise InvalidRequest("The JSON body of your request is nested too deeply.") from None


def invalid(text: str) -> InvalidRequest:
    """A msgspec validation message as a 400 naming the offending field."""
    path = _PATH.search(text)
    prefix = path.group(1) if path and path.group(1) else ""
    for pattern, says in ((_UNKNOWN_FIELD, "Unrecognized request argument supplied: {}"),
                          (_MISSING_FIELD, "Missing required parameter: '{}'.")):
        if named := pattern.search(text):
            param = f"{prefix}.{named.group(1)}" if prefix else named.group(1)
            return InvalidRequest(says.format(param), param=param)
    param = prefix or None
    message = _PATH.sub("", text)
    return InvalidRequest(f"Invalid value for '{param}': {message}" if param else message, param=param)


def _check_int64(value) -> None:
    """Refuse integers outside 64 bits anywhere in ``value``: MessagePack, KV records and
    ClickHouse cannot hold them, and no limit, price or count needs them."""
    stack = [("", msgspec.to_builtins(value))]
    while stack:  # a loop, not recursion: the value may be nested as deep as the decoder allowed
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and item not in _INT64:
            raise InvalidRequest(f"Invalid value for '{path}': integers must fit in 64 bits (signed)",
                                 param=path or None)
