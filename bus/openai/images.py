"""OpenAI image endpoints on the wire: generations and edits."""
