"""Prefect flows: wiring only (see flows/pipeline.py)."""
