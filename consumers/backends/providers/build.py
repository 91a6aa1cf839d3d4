"""A provider model's backend: its upstream's session with the API key from the environment, and
the wire format that upstream speaks."""

from __future__ import annotations

from typing import Mapping

from bus.settings import MEDIA_KINDS, ModelSpec
from consumers.backends.base import Backend
from consumers.backends.providers import anthropic, gemini
from consumers.backends.providers.anthropic import AnthropicMessages
from consumers.backends.providers.gemini import GeminiChat
from consumers.backends.providers.http import Upstream
from consumers.backends.providers.openai import OpenAICompatible
from consumers.backends.providers.openai_media import OpenAIMedia

_BACKENDS = {"openai": OpenAICompatible, "anthropic": AnthropicMessages, "gemini": GeminiChat}


def _openai_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}  # local servers often take no key


_HEADERS = {"openai": _openai_headers, "anthropic": anthropic.auth_headers, "gemini": gemini.auth_headers}


def provider_backend(spec: ModelSpec, env: Mapping[str, str]) -> Backend:
    """The backend for provider model ``spec``; its key is read from ``env`` here, once, and kept in its session."""
    upstream = spec.upstream
    if upstream is None:
        raise ValueError("not a provider model: it names no [providers.<name>]")
    key = ""
    if upstream.api_key_env:
        key = env.get(upstream.api_key_env, "")
        if not key:  # the variable's name only: its value is what must never be printed
            raise ValueError(f"provider {spec.provider}: the environment variable {upstream.api_key_env} "
                             "holding its API key is not set")
    session = Upstream(spec.provider, upstream, _HEADERS[upstream.api](key), secret=key)
    if spec.kind in MEDIA_KINDS:  # only OpenAI-compatible upstreams have them (the settings check says so)
        return OpenAIMedia(spec, session)
    return _BACKENDS[upstream.api](spec, session)
