"""RefineOptions: every parameter of the refinement with its default, validated with clear errors.

Names and meanings are SPARX ``sxlocal_ali3d``'s (spec/local_ali3d.md); defaults are those of its current command
line (``--ts 2``, ``--center 0``, changed there in 2015 from 0.25 and -1). Defaults live here only: the CLI reads
them from this class so ``--help`` shows them.
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

DEVICES = ("auto", "cpu", "gpu", "reference")
INTERPOLATIONS = ("kb", "trilinear")
#: --objective: SPARX's plain correlation, or the correlation of the noise-whitened image and projection; auto
#: (the default): whitened where the box leaves enough background to estimate the noise, else plain.
OBJECTIVES = ("auto", "plain", "whitened")
_FUNCTION_RE = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")


#: The largest point group accepted (icos has 60 operators; beyond, cN/dN insert each image N or 2N times).
MAX_SYMMETRY_ORDER = 120
#: --snr measured: the reconstruction's SNR from the last alignment's scores (RefineOptions.snr).
SNR_MEASURED = "measured"
#: The largest --npad (8^3 times the box's voxels per accumulator already).
MAX_NPAD = 8


@dataclass(frozen=True)
class RefineOptions:
    """Options of ``gpu-ali3d refine`` / ``local_ali3d`` (SPARX names).

    ou : outer radius of the circular masks in pixels; -1 means box // 2 - 2.
    delta : angular bracket in degrees (initial simplex step of the angles).
    ts : shift bracket in pixels (initial simplex step of the shifts).
    maxit : iterations; the loop runs maxit + 1 times, the last one only reconstructs.
    chunk : fraction of the data after which the 3-D map is rebuilt, 0 < chunk <= 1.
    center : -1 centre the data by the average 3-D centre, 1 centre the reference, 0 none.
    CTF : use the particles' CTF parameters.
    snr : signal-to-noise ratio of the Wiener-like reconstruction (SPARX's constant 1/snr added to the weights).
        "measured" (the default): measured from the data each iteration, from the mean score cc of the last
        alignment (the normalised correlation of the images with the reference's sections within the objective's
        band): SNR = cc^2 / (1 - cc^2), used where it exceeds SPARX's 1 (at most 1000), else 1
        (:func:`gpu_ali3d.reconstruct.snr_from_score`); the first reconstruction uses 1. Noisy data (cc < 0.71)
        get SPARX's constant exactly; nearly clean data are hardly regularised. Measured (10 iterations,
        relion_sim clean, 200 particles, SNR 1000): 0.098 deg against 0.226 with snr 1; the noisy sets keep their
        errors. A number: that constant, fixed (SPARX's ``--snr``). None (``--snr auto``): per-shell terms from
        the half sets' FSC (:func:`gpu_ali3d.reconstruct.wiener_regularisation`). Not the default: local_ali3d
        aligns every image to the full map, so the half maps share the noise the alignment fits and their FSC
        rises with it; the smaller terms let more of that noise into the next reference (60 phantom particles at
        32 px, SNR 10, 2 iterations: 3.43 deg with snr 1, 5.91 deg with auto).
    sym : point group: c1, cN, dN, tet, oct, icos.
    function : user function preparing the reference: "ref_ali3d" or "module:callable".
    npad : padding factor of the reconstruction.
    insertion : "trilinear" (each image's own Fourier samples, with the CTF on that grid, spread over 8 voxels of
        the padded grid, as RELION) or "nn4" (SPARX: zero-padded images, CTF on the padded grid, nearest voxel;
        it loses the high frequencies with the CTF on, where the CTF oscillates faster than the box's sampling).
    fourvar : divide the reference by its 3-D Fourier variance (accepted; SPARX's default function ignores it).
    debug : write per-image old/new parameters and criteria; tracebacks on errors.
    MPI : accepted for SPARX compatibility; the run is parallel whenever started under mpirun.
    device : "auto" (GPU when one is usable, else CPU), "cpu" (compiled kernels, OpenMP), "gpu" (CUDA through
        CuPy) or "reference" (the plain numpy reference path, slow; for tests and checks).
    seed : seed of the random generator (half-set assignment, ties), for reproducible runs.
    write_headers : after a successful run, write the refined poses into the input's headers (atomically).
    interpolation : "trilinear" (8 taps, as RELION; the default) or "kb" (Kaiser-Bessel K = 6, SPARX's gridding) for
        sampling the reference's central sections in the objective. Trilinear is the default because it measured
        as accurate or more on every set tried, at 3-4x the speed (2026-12-01, after 3 iterations / 10 on
        relion_sim: 70S box 64 1.710 vs 1.699 deg, GPCR box 128 1.721 vs 1.710, relion_sim clean 0.231 vs 0.241,
        noisy 1.606 vs 1.646).
    batch : images aligned together by the batched simplex (one kernel launch scores all of them); 0 = sized from
        memory (:func:`gpu_ali3d.alignment.alignment_batch`). The poses do not depend on it.
    automask : where no mask file is given, the FSC and the reference are masked by the particle's envelope in each
        iteration's map (:func:`gpu_ali3d.masking.adaptive_mask`: low-passed to 15 A, thresholded at this fraction
        of its maximum, grown by 5 pixels with a 6-pixel soft edge, within the sphere of radius ou) instead of by
        SPARX's sphere alone; 0 gives the sphere (SPARX). Measured (bench/bench_automask.py): on a small particle
        (1,000 GPCR particles at box 128, SNR 0.05, 5 iterations) the median angle error falls from 1.72 to 1.28
        deg and the shift error from 0.28 to 0.23 px; on 2,000 70S particles that fill their sphere (box 64) it
        is unchanged (1.72 and 1.71 deg). The final mask is written as mask.mrc.
    objective : what the alignment maximises. "plain" (SPARX): the normalised correlation of the masked image with
        the CTF-multiplied projection, every Fourier sample within the band weighted alike. "whitened": both
        divided first by the noise's amplitude at each frequency, estimated once per run from the images'
        background beyond the mask (:func:`gpu_ali3d.noise.background_spectrum`, written as
        noise_spectrum.txt), so each frequency counts by its signal-to-noise ratio, as in RELION's likelihood
        (1 / sigma^2 per ring). On white noise (simulations) the two are the same up to the estimate's own noise;
        on coloured noise, as in micrographs, the whitened objective is the matched filter (bench/bench_objective.py).
        "auto" (default): whitened, unless the box leaves fewer than noise.MIN_BACKGROUND_PIXELS pixels beyond
        the mask and its edge to estimate the noise from (ou close to box / 2), then plain; the start line says
        which. Measured side by side (bench/bench_objective.py, six sets) whitened was better on four and within
        0.5 % on the other two.
    image_budget : MiB of host memory a rank's images may take (float32); a rank whose images need more reads them
        batch by batch from their files for the reconstruction and the alignment (memory-mapped MRC stacks, HDF
        image by image) instead of holding them: the same poses, slower by the reads. What is read at once is one
        alignment batch or one insertion call's images (reconstruct.insert_chunk: as in memory, so that the maps
        are the same bit for bit; up to 256 MB of their transforms). 0 (default): half of the memory available
        when the run starts.
    """

    ou: int = -1
    delta: float = 2.0
    ts: float = 2.0
    maxit: int = 10
    chunk: float = 1.0
    center: int = 0
    CTF: bool = False
    snr: float | str | None = SNR_MEASURED
    sym: str = "c1"
    function: str = "ref_ali3d"
    npad: int = 2
    insertion: str = "trilinear"
    fourvar: bool = False
    debug: bool = False
    MPI: bool = False
    device: str = "auto"
    seed: int = 0
    write_headers: bool = False
    interpolation: str = "trilinear"
    batch: int = 0
    image_budget: int = 0
    automask: float = 0.1
    objective: str = "auto"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("ou", self.ou)
        if self.ou != -1 and self.ou < 1:
            raise ValueError(f"--ou {self.ou}: the outer radius must be -1 (box // 2 - 2) or a positive number of pixels")
        if not (math.isfinite(self.delta) and self.delta > 0):
            raise ValueError(f"--delta {self.delta}: the angular bracket must be positive (degrees), e.g. --delta 2")
        if self.delta > 90:
            raise ValueError(f"--delta {self.delta}: local refinement needs a bracket <= 90 degrees")
        if not (math.isfinite(self.ts) and self.ts > 0):
            raise ValueError(f"--ts {self.ts}: the shift bracket must be a positive number of pixels (the simplex "
                             "steps the shifts by it; it refines all five parameters), e.g. --ts 2")
        _check_int("maxit", self.maxit)
        if self.maxit < 0:
            raise ValueError(f"--maxit {self.maxit}: the number of iterations must be >= 0")
        if not 0 < self.chunk <= 1:
            raise ValueError(f"--chunk {self.chunk}: must be a fraction of the data, 0 < chunk <= 1")
        if self.center not in (-1, 0, 1):
            raise ValueError(f"--center {self.center}: must be -1 (centre the data), 0 (none) or 1 (centre the reference)")
        if isinstance(self.snr, str):
            if self.snr != SNR_MEASURED:
                raise ValueError(f"--snr {self.snr!r}: expected a positive number, 'auto' or '{SNR_MEASURED}'")
        elif self.snr is not None and not (isinstance(self.snr, (int, float)) and math.isfinite(self.snr)
                                           and self.snr > 0):
            raise ValueError(f"--snr {self.snr}: must be a positive number, 'auto' (terms from the FSC) or "
                             f"'{SNR_MEASURED}' (from the alignment's scores)")
        from .reconstruct import INSERTIONS
        if self.insertion not in INSERTIONS:
            raise ValueError(f"--insertion {self.insertion!r}: expected one of {', '.join(INSERTIONS)}")
        from .symmetry import symmetry_order
        if symmetry_order(self.sym) > MAX_SYMMETRY_ORDER:
            raise ValueError(f"--sym {self.sym}: {symmetry_order(self.sym)} symmetry operators; at most "
                             f"{MAX_SYMMETRY_ORDER} are supported (every image is inserted once per operator)")
        if not (_FUNCTION_RE.match(self.function) or _is_file_function(self.function)):
            raise ValueError(f"--function {self.function!r}: expected 'ref_ali3d', 'module:callable' (a module on "
                             "sys.path) or 'file.py:callable'")
        _check_int("npad", self.npad)
        if not 1 <= self.npad <= MAX_NPAD:
            raise ValueError(f"--npad {self.npad}: the padding factor must be 1 to {MAX_NPAD} (SPARX uses 2 or 4; "
                             "the Fourier accumulators grow as npad^3)")
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        _check_int("seed", self.seed)
        _check_int("batch", self.batch)
        if self.batch < 0:
            raise ValueError(f"--batch {self.batch}: give a number of images >= 1, or 0 to size it from memory")
        _check_int("image_budget", self.image_budget)
        if self.image_budget < 0:
            raise ValueError(f"--image-budget {self.image_budget}: give MiB >= 1, or 0 for half the available memory")
        if not (isinstance(self.automask, (int, float)) and not isinstance(self.automask, bool)
                and 0 <= self.automask < 1):
            raise ValueError(f"--automask {self.automask!r}: the threshold is a fraction of the map's maximum, "
                             "0 < t < 1, or 0 for SPARX's sphere of radius ou alone")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation {self.interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")

    def outer_radius(self, box: int) -> int:
        """The mask radius in pixels for a box, validated: ou, or box // 2 - 2 when ou is -1."""
        ou = box // 2 - 2 if self.ou == -1 else self.ou
        if ou > box // 2 - 1:
            raise ValueError(f"--ou {self.ou} is larger than a {box}-pixel box allows; use --ou <= {box // 2 - 1}")
        if ou < 1:
            raise ValueError(f"a {box}-pixel box is too small for refinement (outer radius {ou})")
        return ou

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")


def _is_file_function(text: str) -> bool:
    """'path/to/file.py:name' is also accepted for --function."""
    path, _, name = text.rpartition(":")
    return path.endswith(".py") and bool(re.match(r"^[A-Za-z_]\w*$", name)) and bool(Path(path).name)
