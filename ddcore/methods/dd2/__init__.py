"""DD2: the teacher read as a conditional score model. Part 1 (registered as method `dd2`): teacher
samples, the continuous-input teacher, the AR-diffusion model trained with GTS (and DSM) and its
sampler; part 2 (the one-step generator, guidance network, CSD) builds on it (docs/dd2.md)."""
