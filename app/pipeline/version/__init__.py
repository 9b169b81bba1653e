"""Runtime versions: providers, semantic-version ordering (and, later, the VersionWatcher)."""
