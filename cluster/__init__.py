"""Strata's control plane: doors, archive core, catalog, operations, configuration."""

import os

# The node forks (MinIO's restart, with a pre-exec hook) while gRPC's threads run. With
# gRPC's fork support on, its fork handlers can leave the parent's poller in a state it
# aborts on ("Check failed: next_worker->state == KICKED"); a child that only execs needs
# none of them. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
