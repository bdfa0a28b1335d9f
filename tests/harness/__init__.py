"""Test harness: real services (PostgreSQL, Kafka, the MongoDB test server, the gateway) as
pytest fixtures, each started once per test session on random loopback ports."""
