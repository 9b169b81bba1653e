"""Rollouts: builds moved to the fleet stage by stage, gated on heartbeat metrics."""
