"""Model backends: each turns a typed request body into a stream of output."""
