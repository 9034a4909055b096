"""Integration tests: the DIMSE door."""
