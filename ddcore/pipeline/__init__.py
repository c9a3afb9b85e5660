"""The method-agnostic pipeline: where a preset's files live, completion markers, the stages
every method shares (prepare, evaluate, bench, register) and the one runner the CLI, the Prefect
flow and DVC call."""
