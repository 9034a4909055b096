"""Generated gRPC stubs for ``proto/strata/v1/strata.proto``; regenerate with ``make proto``."""
