"""The REST API (DRF): workflows, runs, events, event types."""
