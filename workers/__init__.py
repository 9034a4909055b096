"""Strata's data plane: the code that runs inside Ray on one instance or one batch.

Nothing here starts a network server or imports from ``cluster``.
"""
