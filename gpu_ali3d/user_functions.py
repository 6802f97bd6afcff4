"""User functions: the step that turns each iteration's raw reconstruction into the next reference.

A user function takes SPARX's input list ``ref_data`` and returns ``(volume, centre_shift)``:

* ``ref_data[0]`` mask : float array (M, M, M), numpy order (z, y, x) (soft or binary);
* ``ref_data[1]`` center flag : int (-1, 0, 1; only 1 acts here);
* ``ref_data[2]`` volume : the raw reconstruction, real (M, M, M);
* ``ref_data[3]`` fsc : the half-map FSC, (freq, fsc, n_voxels) as :func:`gpu_ali3d.resolution.fsc_mask` gives;
* ``ref_data[4]`` (MPI path in SPARX) 1 / Fourier variance, and further items: accepted and ignored, as SPARX's
  ``ref_ali3d`` ignores them.

``--function`` names one: ``ref_ali3d`` (built in), ``package.module:callable`` (imported from sys.path) or
``path/to/file.py:callable`` (loaded from that file).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from .resolution import filt_tanl, fit_tanh, phase_centre_of_gravity, shift_volume

log = logging.getLogger(__name__)


def ref_ali3d(ref_data) -> tuple[np.ndarray, np.ndarray]:
    """SPARX ``user_functions.ref_ali3d``: normalise, mask, tanh low-pass fitted to the FSC, optionally centre.

    Order, as SPARX:
    1. mean and standard deviation (n - 1 denominator) of the volume over the voxels where mask <= 0.5, i.e.
       OUTSIDE the mask (SPARX ``Util.infomask(vol, mask, False)``): the background, not the particle;
    2. volf = (volume - mean) / std * mask;
    3. (cutoff, falloff) = :func:`~gpu_ali3d.resolution.fit_tanh` (fsc); volf = ``filt_tanl(volf, cutoff, falloff)``
       (no padding);
    4. if center == 1: c = :func:`~gpu_ali3d.resolution.phase_centre_of_gravity` (volf) of the filtered map and
       volf = ``shift_volume(volf, -c)``; the shift returned is c. Otherwise it is (0, 0, 0).
    Returns (volf float64 (M, M, M), centre_shift float64 (3,) in (x, y, z) order, pixels). The FSC given is not
    modified (SPARX's fit_tanh zeroes its tail in place).
    """
    if not isinstance(ref_data, (list, tuple)) or len(ref_data) < 4:
        size = len(ref_data) if hasattr(ref_data, "__len__") else "?"
        raise ValueError("ref_ali3d: ref_data must be the list [mask, center, volume, fsc (, ...)]; got "
                         f"{type(ref_data).__name__} of length {size}")
    mask = np.asarray(ref_data[0], dtype=np.float64)
    center = ref_data[1]
    vol = np.asarray(ref_data[2], dtype=np.float64)
    curve = ref_data[3]
    if vol.ndim != 3 or mask.shape != vol.shape:
        raise ValueError(f"ref_ali3d: volume {vol.shape} and mask {mask.shape} must be arrays (z, y, x) of one shape")
    background = vol[~(mask > 0.5)]
    if background.size < 2:
        raise ValueError("ref_ali3d: the mask leaves fewer than 2 voxels outside it (mask <= 0.5), and ref_ali3d "
                         "normalises by the background statistics; use a mask smaller than the box")
    std = background.std(ddof=1)
    if not std > 0:
        raise ValueError("ref_ali3d: the volume is constant outside the mask (standard deviation 0), so it cannot be "
                         "normalised by its background as SPARX does; check the reconstruction or the mask")
    volf = (vol - background.mean()) / std * mask
    cutoff, falloff = fit_tanh(curve)
    log.info("Tangent filter:  cut-off frequency = %10.3f        fall-off = %10.3f", cutoff, falloff)
    volf = filt_tanl(volf, cutoff, falloff)
    cs = np.zeros(3)
    if center == 1:
        cs = phase_centre_of_gravity(volf)
        log.info("Center x = %10.3f        Center y = %10.3f        Center z = %10.3f", *cs)
        volf = shift_volume(volf, -cs)
    return volf, cs


#: Built-in user functions by name (SPARX ``user_functions.factory``, the entries this project implements).
BUILTIN = {"ref_ali3d": ref_ali3d}


def load_user_function(spec: str) -> Callable:
    """The user function that ``--function spec`` names.

    spec : "ref_ali3d" (or another key of :data:`BUILTIN`); "package.module:callable" (imported from sys.path);
    "path/to/file.py:callable" (the file is executed as a fresh module, relative paths from the current directory).
    Raises ValueError naming spec for an unknown name, a module that cannot be found, a missing attribute or one
    that is not callable; FileNotFoundError for a missing .py file. Errors raised by the user's own code while
    it is imported propagate unchanged.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--function {spec!r}: expected 'ref_ali3d', 'module:callable' or 'path/to/file.py:callable'")
    source, sep, name = spec.rpartition(":")
    if not sep:
        if spec in BUILTIN:
            return BUILTIN[spec]
        raise ValueError(f"--function {spec!r}: no built-in user function of that name (built in: "
                         f"{', '.join(sorted(BUILTIN))}); for your own give 'module:callable' or 'file.py:callable'")
    if not source or not name.isidentifier():
        raise ValueError(f"--function {spec!r}: expected 'module:callable' or 'path/to/file.py:callable' with a "
                         "Python name after the colon")
    if source.endswith(".py"):
        module = _module_from_file(spec, Path(source))
    else:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (source == exc.name or source.startswith(exc.name + ".")):
                raise                                   # the user's module itself failed to import something
            raise ValueError(f"--function {spec!r}: no module named {source!r} on sys.path (PYTHONPATH); give "
                             "'path/to/file.py:callable' to load from a file") from None
    try:
        func = getattr(module, name)
    except AttributeError:
        raise ValueError(f"--function {spec!r}: {source!r} has no attribute {name!r}") from None
    if not callable(func):
        raise ValueError(f"--function {spec!r}: {source}.{name} is a {type(func).__name__}, not a callable")
    return func


def call_user_function(func: Callable, spec: str, ref_data: list, box: int) -> tuple[np.ndarray, object]:
    """Call a user function as refine does (``func(ref_data)``) and check what it returns.

    Returns (volume float64 (box, box, box), centre). Whatever goes wrong inside the user's code (an exception,
    ``sys.exit``) becomes one ValueError naming ``--function spec``, the exception and where in the user's file it
    was raised; a return value that is not ``(volume, centre)`` with a finite volume of the box's shape is refused
    with the same kind of message. KeyboardInterrupt passes through (the user asked to stop).
    """
    try:
        out = func(ref_data)
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:
        raise ValueError(f"--function {spec}: the function called sys.exit({exc.code!r}); a user function must "
                         "return (volume, centre)") from None
    except BaseException as exc:
        if func is BUILTIN.get(spec) and isinstance(exc, ValueError):
            raise                                      # the built-in's own messages name it already
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise ValueError(f"--function {spec} raised {type(exc).__name__}: {exc} (at {Path(where.filename).name} "
                         f"line {where.lineno})") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError(f"--function {spec} returned {type(out).__name__}"
                         f"{'' if not isinstance(out, (tuple, list)) else f' of length {len(out)}'}; it must "
                         "return (volume, centre)")
    try:
        volume = np.asarray(out[0], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"--function {spec}: its volume is a {type(out[0]).__name__}, not an array") from None
    if volume.shape != (box, box, box):
        raise ValueError(f"--function {spec} returned a volume of shape {volume.shape}; expected ({box}, {box}, {box})")
    if not np.isfinite(volume).all():
        raise ValueError(f"--function {spec} returned a volume with NaN or infinite voxels")
    return volume, out[1]


def _module_from_file(spec: str, path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"--function {spec!r}: no such file {str(path)!r}")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"_gpu_ali3d_user_{resolved.stem}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"--function {spec!r}: cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module                      # so that dataclasses/pickling inside it work
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module
