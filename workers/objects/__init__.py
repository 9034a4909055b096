"""workers/objects."""
