"""Swarms as DAGs of agent tasks, compiled to Celery canvases."""
