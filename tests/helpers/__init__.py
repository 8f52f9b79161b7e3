"""Shared code for the integration tests: server processes, raw HTTP, observations."""
