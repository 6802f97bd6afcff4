"""Benchmarks of gpu-ali3d: ``python -m bench`` runs the suite (bench/__main__.py)."""
