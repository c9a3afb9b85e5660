"""Distillation methods, one package each (`dd1/`), registered in `ddcore.methods.registry`."""
