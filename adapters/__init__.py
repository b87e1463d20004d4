"""Adapters: one module per external system (storage, validation, runtime wiring)."""
