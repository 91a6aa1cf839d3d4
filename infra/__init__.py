"""How the pieces run: the CLI, the local stack supervisor and the nats-server launcher."""
