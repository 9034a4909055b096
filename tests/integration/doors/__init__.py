"""Integration tests: doors."""
