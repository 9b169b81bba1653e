"""The fleet: runners, their heartbeats, organisations, and which build each should run."""
