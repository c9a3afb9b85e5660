"""ddcore: Distilled Decoding for image autoregressive models (library; no orchestration imports)."""

__version__ = "0.1.0"
