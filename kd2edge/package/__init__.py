"""Docker build contexts per device profile, and the serving entrypoint."""
