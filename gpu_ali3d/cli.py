"""The ``gpu-ali3d`` command: refine | demo | simulate | convert | compare | info.

Each subcommand parses, validates, calls the library and returns an exit code. User errors (bad values, unreadable
or malformed files, existing outputs) print one line ``gpu-ali3d: error: ...`` and exit with status 2; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import gc
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .options import DEVICES, INTERPOLATIONS, OBJECTIVES, RefineOptions

#: Options that --continue accepts: where it runs and how it reports, not what it computes.
_CONTINUE_MAY_CHANGE = ("device", "batch", "debug", "image_budget")

#: Errors that end a command with one line and exit status 2: bad values and files, and the OS's refusals (a full
#: disk, a read-only folder, a path through a file: OSError) and a lack of memory, which the user fixes.
USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, NotImplementedError, MemoryError)



def _snr_value(text: str) -> float | str | None:
    """--snr: a positive number, 'auto' (None: Wiener terms from the half sets' FSC) or 'measured'."""
    from .options import SNR_MEASURED

    word = text.strip().lower()
    return None if word == "auto" else SNR_MEASURED if word == SNR_MEASURED else float(text)

def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # Errors Python can only ignore (in __del__: h5py's objects of a file whose write failed print a traceback each)
    # are held back: shown after a success, dropped after a user error, whose one line says it all (--debug: shown).
    ignored, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda u: ignored.append(_unraisable_text(u))      # text now: keep no object alive
    quiet = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings()
            return args.run(args)
    except USER_ERRORS as exc:
        quiet = not getattr(args, "debug", False)
        if not quiet:
            traceback.print_exc()
        print(f"gpu-ali3d: error: {_one_line(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpu-ali3d: interrupted", file=sys.stderr)
        return 130
    finally:
        gc.collect()              # what the failed command's frames held goes now, while the hook holds its noise
        sys.unraisablehook = hook
        for text in ([] if quiet else ignored):
            print(text, end="", file=sys.stderr)


def _unraisable_text(u) -> str:
    """What Python's default sys.unraisablehook prints for ``u``."""
    head = f"{u.err_msg or 'Exception ignored in'}: {u.object!r}\n"
    return head + "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback))


# ------------------------------------------------------------------------------------------------ subcommands
def _cmd_refine(args: argparse.Namespace) -> int:
    from .refine import continue_local_ali3d, local_ali3d

    progress = sys.stderr.isatty()
    if args.continue_dir is not None:
        if args.stack is not None:
            raise ValueError("--continue OUTDIR resumes a run with its own input and options; give no STACK/OUTDIR")
        defaults = RefineOptions()
        given = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in RefineOptions.field_names()
                 if name not in _CONTINUE_MAY_CHANGE and getattr(args, name) != getattr(defaults, name)]
        if given:
            raise ValueError(f"--continue {args.continue_dir} resumes with the run's own options (its job.json); "
                             f"these would be ignored: {', '.join(given)}; start a new run to change them")
        changes = {name: getattr(args, name) for name in _CONTINUE_MAY_CHANGE
                   if getattr(args, name) != getattr(defaults, name)}
        continue_local_ali3d(args.continue_dir, progress=progress, **changes)
        return 0
    if args.stack is None or args.outdir is None:
        raise ValueError("refine needs STACK and OUTDIR (or --continue OUTDIR)")
    opts = RefineOptions(**{name: getattr(args, name) for name in RefineOptions.field_names()})
    local_ali3d(args.stack, args.outdir, args.maskfile, options=opts, progress=progress)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.outdir, n=args.n, box=args.box, maxit=args.maxit, seed=args.seed, progress=sys.stderr.isatty())
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .io.atomic import refuse_existing
    from .io.formats import read_stack, read_volume, stack_format, write_stack
    from .simulate import even_box, phantom, simulate

    if len(args.paths) > 2:
        raise ValueError("simulate takes at most two paths: [MAP] OUT")
    map_path, out = (args.paths if len(args.paths) == 2 else (None, args.paths[0]))
    out = Path(out)
    fmt = stack_format(out)
    if fmt not in ("hdf", "star"):
        raise ValueError(f"{out}: simulate writes a .hdf (EMAN2) or .star (RELION) stack")
    truth_path = out.with_name(f"{out.stem}_truth{out.suffix}")
    for p in (out, truth_path, out.with_suffix(".mrcs")):
        refuse_existing(p)
    if args.n < 1:
        raise ValueError(f"--n {args.n}: need at least one particle")
    if map_path is None:
        if args.box < 16:
            raise ValueError(f"--box {args.box}: use at least 16 pixels")
        if args.box % 2:
            raise ValueError(f"--box {args.box}: particle boxes are even (RELION extracts even boxes only and "
                             f"mishandles odd ones); use --box {args.box - 1} or {args.box + 1}")
        volume, apix = phantom(args.box), args.apix or 4.0
    else:
        volume, header_apix = read_volume(map_path)
        if len(set(volume.shape)) != 1:
            raise ValueError(f"{map_path}: the map must be cubic, got shape {volume.shape}")
        volume, map_box = even_box(volume)
        if map_box != volume.shape[0]:
            print(f"{map_path}: the map's box is odd ({map_box}^3); padded to {volume.shape[0]}^3 (centre kept) so "
                  f"the particles are {volume.shape[0]} pixels: RELION extracts even boxes only")
        apix = args.apix or header_apix or 4.0
    if not apix > 0:
        raise ValueError(f"--apix {apix}: the pixel size must be positive (Angstrom)")
    rng = np.random.default_rng(args.seed)
    stack, truth = simulate(volume, args.n, apix_A=apix, snr=args.snr, angle_error_deg=args.angle_error,
                            shift_error_px=args.shift_error, ctf=args.ctf, rng=rng)
    write_stack(stack, out)
    try:
        written = read_stack(out)
        written.poses = truth
        write_stack(written, truth_path)
    except BaseException:
        for p in (out, out.with_suffix(".mrcs")):
            p.unlink(missing_ok=True)
        raise
    print(f"wrote {len(stack)} particles ({stack.box} px, {apix:g} A/px, SNR {args.snr:g}, CTF {'on' if args.ctf else 'off'})"
          f" to {out} (starting poses: {args.angle_error:g} deg / {args.shift_error:g} px off) and the true poses"
          f" to {truth_path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .io.formats import read_stack, write_stack

    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: output and input are the same file")
    stack = read_stack(src)
    for note in stack.ctf_notes:
        print(note)
    write_stack(stack, dst, overwrite=False)
    print(f"converted {len(stack)} particles: {src} -> {dst}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .accuracy import gauge_free_angle_errors
    from .geometry import shift_distance
    from .io.formats import read_stack

    a, b = read_stack(args.poses), read_stack(args.truth)
    if len(a) != len(b):
        raise ValueError(f"{args.poses} has {len(a)} particles but {args.truth} has {len(b)}; compare the same set")
    angle = gauge_free_angle_errors(a.poses, b.poses)
    shift = shift_distance(a.poses, b.poses)
    print(f"{len(a)} particles: angle error median {np.median(angle):.3f} deg, mean {angle.mean():.3f}, "
          f"90th percentile {np.percentile(angle, 90):.3f} (one global rotation removed); shift error median "
          f"{np.median(shift):.3f} px, mean {shift.mean():.3f}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .io.formats import read_stack, stack_format

    stack = read_stack(args.stack)
    print(describe_stack(stack, args.stack, stack_format(args.stack)))
    if args.check:
        from tqdm import tqdm
        for _ in tqdm(stack.iter_chunks(1024), total=-(-len(stack) // 1024), desc="checking images", unit="chunk"):
            pass
        print("all images readable and finite")
    return 0


def describe_stack(stack, path, fmt: str) -> str:
    """Human-readable summary of a particle stack (counts, box, pixel size, pose and CTF statistics)."""
    n, box = len(stack), stack.box
    p = stack.poses
    shift = np.hypot(p[:, 3], p[:, 4])
    lines = [
        f"{path}: {fmt} stack, {n} particles, {box} x {box} pixels, {stack.apix_A:g} A/pixel",
        f"  images: {n * box * box * 4 / 2**20:.1f} MiB as float32"
        + (f", in {len({r.split('@', 1)[-1] for r in stack.image_refs})} file(s)" if stack.image_refs else ""),
        f"  phi   {p[:, 0].min():8.2f} .. {p[:, 0].max():8.2f} deg",
        f"  theta {p[:, 1].min():8.2f} .. {p[:, 1].max():8.2f} deg",
        f"  psi   {p[:, 2].min():8.2f} .. {p[:, 2].max():8.2f} deg",
        f"  shift |s| mean {shift.mean():.3f}, max {shift.max():.3f} px (sx {p[:, 3].mean():+.3f}, sy {p[:, 4].mean():+.3f} mean)",
    ]
    if stack.ctf is None:
        lines.append("  CTF: none" + (f" usable ({stack.ctf_refusal})" if stack.ctf_refusal else ""))
    else:
        c = stack.ctf
        df = 0.5 * (c.defocus_u_A + c.defocus_v_A)
        lines.append(f"  CTF: defocus {df.min() / 1e4:.3f} .. {df.max() / 1e4:.3f} um, astigmatism max "
                     f"{np.abs(c.defocus_u_A - c.defocus_v_A).max():.0f} A, {c.voltage_kV[0]:g} kV, Cs {c.cs_mm[0]:g} mm, "
                     f"amplitude contrast {c.amp_contrast[0]:g}")
        lines += [f"  CTF note: {note}" for note in stack.ctf_notes]
        if stack.ctf_refusal:
            lines.append(f"  CTF not usable with --CTF: {stack.ctf_refusal}")
    if not stack.has_poses:
        lines.append("  poses: none (images only; refine needs a .star, .cs or .hdf with starting poses)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the parser
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-ali3d", description="GPU local refinement of cryo-EM particle poses "
                                     "(SPARX sxlocal_ali3d).")
    parser.add_argument("--version", action="version", version=f"gpu-ali3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    d = RefineOptions
    r = sub.add_parser("refine", help="local refinement of particle poses", formatter_class=_Formatter,
                       description="Refine each particle's pose (phi, theta, psi, sx, sy) locally against "
                       "projections of a map rebuilt from the data each iteration.")
    r.add_argument("stack", nargs="?", help="particles with approximate poses: .hdf (EMAN2), .star (RELION), "
                   ".cs (cryoSPARC)")
    r.add_argument("outdir", nargs="?", help="output directory (must not exist)")
    r.add_argument("maskfile", nargs="?", default=None, help="3-D mask (.hdf/.mrc); default a sphere of radius ou")
    r.add_argument("--ou", type=int, default=d.ou, help="outer radius of the masks in pixels (-1: box//2 - 2)")
    r.add_argument("--delta", type=float, default=d.delta, help="angular bracket, degrees")
    r.add_argument("--ts", type=float, default=d.ts, help="shift bracket, pixels")
    r.add_argument("--maxit", type=int, default=d.maxit, help="iterations")
    r.add_argument("--chunk", type=float, default=d.chunk, help="fraction of the data after which the map is rebuilt")
    r.add_argument("--center", type=int, default=d.center, choices=(-1, 0, 1),
                   help="-1 centre the data, 1 centre the reference, 0 none")
    r.add_argument("--CTF", action="store_true", default=d.CTF, help="use the CTF parameters of the particles")
    r.add_argument("--snr", type=_snr_value, default=d.snr,
                   help="SNR of the reconstruction: 'measured' (default: from the alignment's scores, at least 1), a "
                        "number (SPARX's constant, fixed) or 'auto' (per shell from the half sets' FSC)")
    r.add_argument("--sym", default=d.sym, help="point group: c1, cN, dN, tet, oct, icos")
    r.add_argument("--function", default=d.function, help="reference preparation: ref_ali3d or module:callable")
    r.add_argument("--npad", type=int, default=d.npad, help="padding factor of the reconstruction")
    r.add_argument("--insertion", default=d.insertion, choices=("trilinear", "nn4"),
                   help="back-projection: trilinear (RELION-like, CTF on the image's own grid) or nn4 (SPARX)")
    r.add_argument("--Fourvar", "--fourvar", dest="fourvar", action="store_true", default=d.fourvar,
                   help="Fourier variance normalisation (SPARX compatibility)")
    r.add_argument("--debug", action="store_true", default=d.debug, help="per-image details; tracebacks on errors")
    r.add_argument("--MPI", action="store_true", default=d.MPI, help="accepted for SPARX compatibility")
    r.add_argument("--device", default=d.device, choices=DEVICES, help="where to compute")
    r.add_argument("--seed", type=int, default=d.seed, help="random seed (half sets), for reproducible runs")
    r.add_argument("--write-headers", dest="write_headers", action="store_true", default=d.write_headers,
                   help="after a successful run, write the refined poses into the input (atomically)")
    r.add_argument("--continue", dest="continue_dir", metavar="OUTDIR", default=None,
                   help="resume an interrupted run from its checkpoint (same input and options)")
    r.add_argument("--batch", type=int, default=d.batch,
                   help="images aligned together (0: sized from memory); the result does not depend on it")
    r.add_argument("--image-budget", type=int, default=d.image_budget, metavar="MiB",
                   help="host memory a rank's images may take; beyond it they are read batch by batch from their "
                        "files (same poses); 0: half of the available memory")
    r.add_argument("--automask", type=float, default=d.automask, metavar="FRACTION",
                   help="without a mask file, mask the FSC and the reference by the particle's envelope in each "
                        "map, thresholded at this fraction of its maximum; 0: the sphere of radius ou (SPARX)")
    r.add_argument("--objective", default=d.objective, choices=OBJECTIVES,
                   help="what the alignment maximises: SPARX's correlation (plain), or the correlation of image "
                        "and projection whitened by the noise spectrum of the images' background (whitened); auto: "
                        "whitened where the box leaves room beyond ou to estimate the noise, else plain")
    r.add_argument("--interpolation", default=d.interpolation, choices=INTERPOLATIONS,
                   help="reference sampling in the objective: Kaiser-Bessel (SPARX) or trilinear (faster)")
    r.set_defaults(run=_cmd_refine)

    s = sub.add_parser("simulate", help="simulated particles with known poses", formatter_class=_Formatter,
                       description="Project a map (or a built-in phantom when no map is given) at random "
                       "orientations with CTF and white noise; write the stack with perturbed starting poses to OUT "
                       "and the true poses to OUT_truth (same format).")
    s.add_argument("paths", nargs="+", metavar="[MAP] OUT", help="optional map (.mrc/.hdf), then OUT.hdf or OUT.star")
    s.add_argument("--n", type=int, default=200, help="number of particles")
    s.add_argument("--snr", type=float, default=0.1, help="signal variance / noise variance (inf: no noise)")
    s.add_argument("--angle-error", type=float, default=4.0, help="rotation of each starting pose, degrees")
    s.add_argument("--shift-error", type=float, default=1.5, help="offset of each starting shift, pixels")
    s.add_argument("--ctf", action="store_true", help="apply a CTF (defocus 1-3 um, 300 kV)")
    s.add_argument("--apix", type=float, default=None, help="pixel size in Angstrom (default: the map's, or 4.0)")
    s.add_argument("--box", type=int, default=64, help="box size of the built-in phantom")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--debug", action="store_true", help="tracebacks on errors")
    s.set_defaults(run=_cmd_simulate)

    c = sub.add_parser("convert", help="convert a particle stack between formats", formatter_class=_Formatter,
                       description="Convert between EMAN2 HDF, RELION STAR (3.0/3.1) and cryoSPARC .cs, keeping "
                       "poses and CTF. The format follows the file suffix.")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--debug", action="store_true", help="tracebacks on errors")
    c.set_defaults(run=_cmd_convert)

    m = sub.add_parser("demo", help="simulate, refine and report the pose error (a first run)",
                       formatter_class=_Formatter,
                       description="Simulate particles from the built-in phantom with CTF and noise, starting 4 "
                       "degrees / 1.5 pixels off their true poses, refine them, and print the error before and after.")
    m.add_argument("outdir", nargs="?", default="gpu-ali3d-demo", help="output directory (must not exist)")
    m.add_argument("--n", type=int, default=300, help="number of particles")
    m.add_argument("--box", type=int, default=64, help="box size of the phantom")
    m.add_argument("--maxit", type=int, default=3, help="iterations")
    m.add_argument("--seed", type=int, default=0, help="random seed")
    m.add_argument("--debug", action="store_true", help="tracebacks on errors")
    m.set_defaults(run=_cmd_demo)

    q = sub.add_parser("compare", help="pose errors of one stack against another (e.g. simulate's truth)",
                       formatter_class=_Formatter,
                       description="Angular error of every particle's pose in POSES against TRUTH (same particles, "
                       "same order), with the one global rotation a refinement cannot fix removed, and the shift "
                       "error in pixels; prints median, mean and 90th percentile.")
    q.add_argument("poses", help="refined stack, e.g. OUTDIR/particles.star")
    q.add_argument("truth", help="the true poses, e.g. the _truth file gpu-ali3d simulate wrote")
    q.add_argument("--debug", action="store_true", help="tracebacks on errors")
    q.set_defaults(run=_cmd_compare)

    i = sub.add_parser("info", help="describe a particle stack", formatter_class=_Formatter)
    i.add_argument("stack")
    i.add_argument("--check", action="store_true", help="read every image and check it is finite")
    i.add_argument("--debug", action="store_true", help="tracebacks on errors")
    i.set_defaults(run=_cmd_info)
    return parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    pass


def _one_line_warnings():
    """A ``warnings.showwarning`` for one command: each library warning (e.g. io.star.OddBoxWarning, which every
    odd-box STAR written raises) said once, as one line ``gpu-ali3d: warning: ...`` on stderr."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in said:
            said.add(text)
            print(f"gpu-ali3d: warning: {text}", file=sys.stderr if file is None else file)
    return show


def _one_line(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    """The error as one line. An OS error that names a file reads 'FILE: reason; what to do'; a lack of memory
    says how much was asked for (where numpy or CuPy say) and what makes a refinement need less."""
    if isinstance(exc, MemoryError):
        text = " ".join(str(exc).split())
        hint = ("; use a smaller --batch (images aligned together), fewer MPI ranks per machine, or a smaller "
                "--npad" if getattr(args, "command", None) == "refine" else "")
        return f"out of memory{': ' + text if text else ''}{hint}"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        names = f"{exc.filename}" + ("" if exc.filename2 is None else f" -> {exc.filename2}")
        return f"{names}: {exc.strerror}{_os_advice(exc.errno, args)}"
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _os_advice(code: int | None, args) -> str:
    outdir = getattr(args, "continue_dir", None) or getattr(args, "outdir", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        if getattr(args, "command", None) == "refine" and outdir and (Path(outdir) / "checkpoint.npz").is_file():
            return f"; free some space, then resume with gpu-ali3d refine --continue {outdir}"
        return "; free some space (or write elsewhere), then run the command again"
    if code == errno.EROFS:
        return "; that file system is read-only: write elsewhere"
    if code in (errno.EACCES, errno.EPERM):
        return "; check its permissions, or choose another place"
    if code == errno.ENOTDIR:
        return "; a part of that path is a file, not a folder"
    return ""


if __name__ == "__main__":
    sys.exit(main())
