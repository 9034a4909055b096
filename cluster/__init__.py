"""Strata's control plane: front ends, scheduling, catalog, tiering, configuration."""
