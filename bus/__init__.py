"""Shared kernel: wire types, signing, subjects, provisioning, settings and the client SDK."""
