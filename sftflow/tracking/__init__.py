"""Tracking: MLflow runs, the model registry, lineage."""
