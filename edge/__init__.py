"""The thin HTTP face: OpenAI-compatible routes, auth, admission, publishing and SSE relay."""
