"""Particle stacks and volumes in EMAN2/SPARX HDF, RELION STAR + MRC, and cryoSPARC .cs formats."""
from .stack import ArrayImages, ImageSource, ParticleStack

__all__ = ["ArrayImages", "ImageSource", "ParticleStack"]
