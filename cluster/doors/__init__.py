"""The doors: thin adapters from a protocol to the archive core (``cluster.archive``)."""
