"""cluster/doors/grpc."""
