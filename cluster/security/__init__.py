"""Who may reach the archive: exposure rules for the doors, authentication, audit."""
