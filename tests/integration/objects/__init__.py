"""Integration tests: objects."""
