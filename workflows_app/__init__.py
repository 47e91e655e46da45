"""Workflow definitions (DAGs of Celery tasks), their runs, and the engine that advances them."""
