"""cluster/ops."""
