"""VLM clients: one protocol (``base.VLMClient``), one module per backend."""
