"""The OpenAI surface on the bus: wire types and conversions, one module per endpoint family,
shared by the edge and the SDK."""
