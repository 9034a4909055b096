"""Integration tests: catalog."""
