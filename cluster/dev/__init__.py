"""cluster/dev."""
