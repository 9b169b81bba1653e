"""Post-update sweeps: workflows dispatched to opted-in repositories."""
