"""Integration tests: doors/grpc."""
