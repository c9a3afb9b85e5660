"""AR teachers behind one family-agnostic interface (see base.Teacher)."""
