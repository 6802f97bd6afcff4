"""gpu-ali3d: local refinement of cryo-EM particle poses (a re-implementation of SPARX sxlocal_ali3d).

Conventions are stated once in :mod:`gpu_ali3d.geometry` (angles, shifts) and :mod:`gpu_ali3d.ctf` (defocus).
Importing the package needs neither CUDA, MPI nor a compiler.
"""
__version__ = "0.1.0"


def local_ali3d(stack, outdir, maskfile=None, **options):
    """Local refinement of particle poses (SPARX names and defaults); see :func:`gpu_ali3d.refine.local_ali3d`."""
    from .refine import local_ali3d as _local_ali3d
    return _local_ali3d(stack, outdir, maskfile, **options)
