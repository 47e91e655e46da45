"""Benchmarks of Eventflow against hand-wired Celery canvas; `python bench/run.py` runs them all."""
