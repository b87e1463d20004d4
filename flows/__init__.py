"""Prefect flows: each sequences tasks and plain functions, and decides nothing itself."""
