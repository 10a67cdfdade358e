"""Orchestration: the only layer that reads and writes files or talks to Dask."""
