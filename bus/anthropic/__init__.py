"""The Anthropic Messages surface on the bus: wire types and conversions, beside ``bus.openai``."""
