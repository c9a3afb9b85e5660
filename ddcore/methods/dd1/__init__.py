"""DD1: AR flow matching, trajectory data, the distilled student, few-step sampling."""
