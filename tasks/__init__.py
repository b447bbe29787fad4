"""Pipeline stages: one module per stage, a plain typed function plus a thin Prefect task."""
