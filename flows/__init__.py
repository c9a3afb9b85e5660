"""Prefect flows: orchestration only; the work lives in `ddcore.stages`."""
