"""Prefect tasks: thin wrappers over adapter calls, with retries on IO only."""
