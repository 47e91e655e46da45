"""Event types (queues with a parallelism limit) and the Events that drive every task."""
