"""Other systems measured beside AIQ in the same run, each in a bench-only environment (never a project dependency)."""
