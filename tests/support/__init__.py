"""Helpers that several test modules (and bench scripts) share."""
