"""Glue between params.yaml, the files DVC tracks, and the components library."""
