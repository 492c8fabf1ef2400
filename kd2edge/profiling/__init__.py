"""On-device profiling against the profile's budgets (runtime only, no torch)."""
