"""Provider workers: backends that forward a model's work to an upstream over HTTP.

``http`` holds what every upstream shares (a pooled client session, timeouts, retries
with backoff, upstream errors as our typed errors); one module per wire format
translates our bodies and the upstream's answers both ways: ``openai`` (OpenAI and
every server speaking its API: vLLM, Ollama, LocalAI, TGI, llama.cpp), ``anthropic``
(Messages) and ``gemini`` (generateContent).
"""
