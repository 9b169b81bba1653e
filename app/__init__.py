"""update-pipeline: safe upgrades of AI coding-agent runtimes across a fleet of runners."""

__version__ = "0.1.0"
