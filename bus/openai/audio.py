"""OpenAI audio endpoints on the wire: transcriptions and translations (speech to text), speech (text to speech)."""
