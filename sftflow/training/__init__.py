"""Supervised fine-tuning, read like a torchtune recipe: ``loop.train`` is the recipe (set up,
train, save) and leans on ``data`` (encoding, batching), ``loss`` (fused cross-entropy and the one
held-out loss), ``model`` (device, precision, base model, adapters), ``checkpoint`` (atomic
save/resume) and ``export`` (adapter, merged weights, model card, loss curve)."""
