"""DD2: the teacher read as a conditional score model, the AR-diffusion model (Stage 1, GTS) and,
next, conditional score distillation. Not yet registered as a method: its pieces are built and
tested one by one (docs/dd2.md)."""
