"""Fuzzing of the format parser and image reader (see harness.py)."""
