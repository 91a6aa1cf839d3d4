"""NATS server configuration: a user per role, each allowed only the subjects its role needs."""
