"""The contrast transfer function: per-particle parameters, their EMAN2/RELION forms, and evaluation on grids.

Convention (RELION's, and EMAN2Ctf's): defocus is positive for underfocus; the defocus along the azimuth
``a = atan2(fy, fx)`` (fy along image rows, fx along columns, anticlockwise from +x) is

    df(a) = (U + V) / 2 + (U - V) / 2 * cos(2 * (a - astig_angle))

so U is the defocus along ``astig_angle``. With wavelength lambda (relativistic) and spatial frequency s (1/A):

    gamma = pi * lambda * df * s^2 - pi / 2 * Cs * lambda^3 * s^4
    CTF   = (sqrt(1 - Q^2) * sin(gamma) + Q * cos(gamma)) * exp(-B * s^2 / 4)

so CTF(0) = +Q: the low frequencies of an image keep the contrast of the map's projection (as in RELION).
EMAN2Ctf stores the mean defocus and ``dfdiff = U - V`` in micrometres, ``dfang`` = the angle of U in degrees,
amplitude contrast in percent, B-factor in A^2.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class CTFParams:
    """CTF parameters of n particles, each a float64 array of shape (n,).

    defocus_u_A, defocus_v_A : Angstrom, positive underfocus. astig_angle_deg : degrees, direction of U.
    voltage_kV : kilovolts. cs_mm : spherical aberration, mm. amp_contrast : fraction 0..1 (not percent).
    bfactor_A2 : envelope B-factor, A^2 (0 = none).
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    astig_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amp_contrast: np.ndarray
    bfactor_A2: np.ndarray

    def __post_init__(self) -> None:
        n = max(np.size(getattr(self, f.name)) for f in fields(self))
        for f in fields(self):
            v = np.asarray(getattr(self, f.name), dtype=np.float64)
            if v.ndim > 1 or (v.size not in (1, n)):
                raise ValueError(f"CTFParams.{f.name}: expected a scalar or an array of {n} values, got shape {v.shape}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"CTFParams.{f.name}: non-finite value {v[~np.isfinite(v)][0]}")
            setattr(self, f.name, np.broadcast_to(v.reshape(-1), (n,)).copy())
        if np.any((self.amp_contrast < 0) | (self.amp_contrast >= 1)):
            raise ValueError(f"amplitude contrast must be a fraction in [0, 1), got {self.amp_contrast.max()}"
                             " (EMAN2 gives percent: divide by 100)")
        if np.any(self.voltage_kV <= 0):
            raise ValueError(f"voltage must be positive (kV), got {self.voltage_kV.min()}")

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    def __getitem__(self, index) -> "CTFParams":
        """The parameters of a subset of particles (index: int, slice, or integer/boolean array)."""
        index = np.atleast_1d(np.arange(len(self))[index])
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def concatenate(parts: list["CTFParams"]) -> "CTFParams":
        return CTFParams(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(CTFParams)})

    def allclose(self, other: "CTFParams", rtol: float = 1e-6, atol: float = 1e-6) -> bool:
        return all(np.allclose(getattr(self, f.name), getattr(other, f.name), rtol=rtol, atol=atol)
                   for f in fields(self))


def check_ctf_arguments(ctf: "CTFParams | None", n: int, apix_A: float, what: str = "images") -> None:
    """ValueError unless ctf is None or holds one entry per item (n ``what``) or one for all, and apix_A is a
    positive pixel size in Angstrom: the arguments every function that applies a CTF takes."""
    if ctf is not None and len(ctf) not in (1, n):
        raise ValueError(f"ctf has {len(ctf)} entries for {n} {what}; give one per {what[:-1]} (or one for all)")
    if not (np.isfinite(apix_A) and apix_A > 0):
        raise ValueError(f"apix_A must be a positive pixel size in Angstrom; got {apix_A}")


def wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV (RELION's constants)."""
    v = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def evaluate(ctf: CTFParams, fx_invA, fy_invA, *, dtype=np.float64, xp=np):
    """CTF values at spatial frequencies (module docstring for the formula).

    fx_invA, fy_invA : host arrays broadcastable to each other, spatial frequency in 1/Angstrom (fx along columns,
    fy along rows). dtype : float64 (default), or float32 for the compiled paths, which read float32 CTFs: the
    per-particle arithmetic then runs in float32 (gamma, up to some 10^2 rad at high resolution, to ~1e-5 rad).
    xp : the array module of the result (numpy, or cupy: the shared frequency grids and the per-particle
    coefficients, made on the host in float64, go up once, and the (n, S) planes are made on the device).
    Returns an xp array of dtype and shape (n,) + broadcast shape, one plane per particle.
    """
    fx = np.asarray(fx_invA, dtype=np.float64)[None]
    fy = np.asarray(fy_invA, dtype=np.float64)[None]
    extra = (1,) * max(fx.ndim - 1, fy.ndim - 1)
    par = {f.name: getattr(ctf, f.name).reshape((-1,) + extra) for f in fields(ctf)}
    s2 = fx * fx + fy * fy
    azimuth = np.arctan2(fy, fx)
    # cos(2 (azimuth - angle)) expanded, so the per-particle work is products of the shared grids; and
    # sqrt(1 - q^2) sin(gamma) + q cos(gamma) = sin(gamma + asin(q)): one sine per sample
    cos2, sin2 = np.cos(2.0 * azimuth), np.sin(2.0 * azimuth)
    angle = 2.0 * np.deg2rad(par["astig_angle_deg"])
    mean = 0.5 * (par["defocus_u_A"] + par["defocus_v_A"])
    half_diff = 0.5 * (par["defocus_u_A"] - par["defocus_v_A"])
    lam = wavelength_A(par["voltage_kV"])
    cs_A = par["cs_mm"] * 1e7
    q = par["amp_contrast"]
    damped = bool(np.any(par["bfactor_A2"] != 0))
    if np.dtype(dtype) == np.float32:
        # gamma = a s2 + b s2 cos2 + c s2 sin2 - d s2^2 + e: the shared grids and the per-particle coefficients
        # made in float64, rounded to float32 once
        up = lambda a: xp.asarray(np.asarray(a, np.float32))
        s2_32, c2_32, s2c, s2s = (up(g) for g in (s2, s2 * cos2, s2 * sin2, s2 * s2))
        gamma = (up(np.pi * lam * mean) * s2_32 + up(np.pi * lam * half_diff * np.cos(angle)) * c2_32
                 + up(np.pi * lam * half_diff * np.sin(angle)) * s2c - up(0.5 * np.pi * cs_A * lam ** 3) * s2s
                 + up(np.arcsin(q)))
        out = xp.sin(gamma)
        if damped:
            out *= xp.exp(up(-0.25 * par["bfactor_A2"]) * s2_32)
        return out
    if np.dtype(dtype) != np.float64:
        raise ValueError(f"dtype={dtype!r}: the CTF is evaluated in float64 or float32")
    up = xp.asarray
    s2_d = up(s2)
    defocus_term = (up(np.pi * lam) * (up(mean) + up(half_diff * np.cos(angle)) * up(cos2)
                                       + up(half_diff * np.sin(angle)) * up(sin2)))
    gamma = (defocus_term - up(0.5 * np.pi * cs_A * lam ** 3) * s2_d) * s2_d + up(np.arcsin(q))
    out = xp.sin(gamma)
    if damped:
        out *= xp.exp(up(-0.25 * par["bfactor_A2"]) * s2_d)
    return out


def ctf_grid(ctf: CTFParams, box: int, apix_A: float, *, half: bool = True, dtype=np.float64, xp=np):
    """CTF of every particle on the FFT grid of a box x box image.

    Returns dtype (float64, or float32: :func:`evaluate`) (n, box, box // 2 + 1) for ``half=True`` (the layout
    of ``np.fft.rfft2``) or (n, box, box) (``np.fft.fft2``); FFT order, origin at index 0, not centred; an array
    of ``xp`` (:func:`evaluate`).
    """
    fy = np.fft.fftfreq(box)[:, None] / apix_A
    fx = (np.fft.rfftfreq(box) if half else np.fft.fftfreq(box))[None, :] / apix_A
    return evaluate(ctf, fx, fy, dtype=dtype, xp=xp)


# --------------------------------------------------------------------------------------------- EMAN2 / RELION
def from_relion(defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm, amp_contrast,
                bfactor_A2=0.0) -> CTFParams:
    """RELION columns (rlnDefocusU/V in A, rlnDefocusAngle, rlnVoltage, rlnSphericalAberration,
    rlnAmplitudeContrast as a fraction, rlnCtfBfactor) -> CTFParams. RELION's convention is ours."""
    return CTFParams(defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm, amp_contrast, bfactor_A2)


def to_relion(ctf: CTFParams) -> dict[str, np.ndarray]:
    """CTFParams -> RELION per-particle columns keyed by their STAR names (optics values separately)."""
    return {"rlnDefocusU": ctf.defocus_u_A, "rlnDefocusV": ctf.defocus_v_A,
            "rlnDefocusAngle": ctf.astig_angle_deg, "rlnCtfBfactor": ctf.bfactor_A2}


def from_eman2(defocus_um, dfdiff_um, dfang_deg, bfactor_A2, ampcont_percent, voltage_kV, cs_mm) -> CTFParams:
    """EMAN2Ctf fields (mean defocus and U - V in micrometres, percent amplitude contrast) -> CTFParams."""
    mean = np.asarray(defocus_um, dtype=np.float64) * 1e4
    half = np.asarray(dfdiff_um, dtype=np.float64) * 0.5e4
    return CTFParams(mean + half, mean - half, dfang_deg, voltage_kV, cs_mm,
                     np.asarray(ampcont_percent, dtype=np.float64) / 100.0, bfactor_A2)


def to_eman2(ctf: CTFParams) -> dict[str, np.ndarray]:
    """CTFParams -> EMAN2Ctf fields: defocus and dfdiff in micrometres, dfang degrees, ampcont percent."""
    return {"defocus": 0.5e-4 * (ctf.defocus_u_A + ctf.defocus_v_A), "dfdiff": 1e-4 * (ctf.defocus_u_A - ctf.defocus_v_A),
            "dfang": ctf.astig_angle_deg, "bfactor": ctf.bfactor_A2, "ampcont": 100.0 * ctf.amp_contrast,
            "voltage": ctf.voltage_kV, "cs": ctf.cs_mm}


def eman2_ctf_string(ctf: CTFParams, index: int, apix_A: float) -> str:
    """The EMAN2Ctf string of one particle, exactly as ``EMAN2Ctf::to_string`` (libEM/ctf.cpp) lays it out.

    ``E`` then defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs, apix, dsbg as ``%1.10g`` separated by
    single spaces, then `` <n>`` and n background values each as ``,%1.3g``, then `` <m>`` and m SNR values the
    same way. We write dsbg 0 and empty arrays: ``E2.1 0.1 30 0 10 300 2.7 1.5 0 0 0``. EMAN2's
    ``from_string`` reads it with ``sscanf("%c%f %f ...")``, so commas between the scalars would not parse.
    """
    e = to_eman2(ctf[index])
    vals = [e["defocus"][0], e["dfdiff"][0], e["dfang"][0], e["bfactor"][0], e["ampcont"][0], e["voltage"][0],
            e["cs"][0], apix_A, 0.0]
    return "E" + " ".join(f"{v:1.10g}" for v in vals) + " 0 0"


def parse_eman2_ctf_string(text: str) -> tuple[CTFParams, float]:
    """Parse an EMAN2Ctf string (``E...``) or the old EMAN1 form (``O...``) -> (CTFParams of one particle, apix_A).

    EMAN2 (``EMAN2Ctf::from_string``): ``E`` + 9 whitespace-separated scalars (defocus um, dfdiff um, dfang deg,
    bfactor A^2, ampcont %, voltage kV, cs mm, apix A, dsbg), then ``<n>,v1,...,vn`` (background) and
    ``<m>,v1,...,vm`` (SNR); the SNR part may be missing, as EMAN2's reader allows. The arrays are read and
    dropped.

    EMAN1 (``EMAN1Ctf::to_string/from_string``): ``O`` + 11 space-separated numbers: defocus (um, *negative* for
    underfocus), bfactor (EMAN1's B, envelope exp(-B s^2): EMAN2's B = 4 x this), amplitude, ampcont (a
    fraction), noise1..noise4, voltage kV, cs mm, apix A. No astigmatism.

    Raises ValueError naming the problem for anything else.
    """
    if not isinstance(text, str) or len(text) < 2 or text[0] not in "EO":
        raise ValueError(f"unparsable ctf string {str(text)[:60]!r}: expected EMAN2Ctf 'E...' or EMAN1 'O...'")
    try:
        if text[0] == "E":
            tokens = text[1:].split()
            if len(tokens) not in (10, 11):
                raise ValueError(f"expected 9 space-separated numbers and 2 arrays 'n,v1,...', got {len(tokens)} "
                                 "fields")
            defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs, apix, _dsbg = (float(t) for t in tokens[:9])
            for name, token in zip(("background", "SNR"), tokens[9:]):
                count, *values = token.split(",")
                if int(count) != len(values):
                    raise ValueError(f"{name} array says {count} values but holds {len(values)}")
                [float(v) for v in values]
        else:
            tokens = text[1:].replace(",", " ").split()
            if len(tokens) < 11:
                raise ValueError(f"expected 11 numbers, got {len(tokens)}")
            (defocus, bfactor, _amplitude, ampcont, _n1, _n2, _n3, _n4, voltage, cs,
             apix) = (float(t) for t in tokens[:11])
            # EMAN1 -> EMAN2 as EMAN1Ctf::from_string converts: defocus sign, B-factor convention, percent.
            defocus, dfdiff, dfang, bfactor, ampcont = -defocus, 0.0, 0.0, 4.0 * bfactor, 100.0 * ampcont
        params = from_eman2(defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"unparsable ctf string {text[:60]!r}: {exc}") from None
    return params, apix
