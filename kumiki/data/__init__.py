"""Offline datasets, partitioners and the per-site folder format."""
