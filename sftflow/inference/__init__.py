"""Inference: prompt formatting, model provisioning/loading, batched generation and scoring."""
