"""The local_ali3d driver: iterations, chunks, reconstructions, alignment, outputs. It owns no numerics.

Per iteration and chunk (spec/local_ali3d.md): optionally centre the data (center -1), reconstruct two half maps
and the full map (:mod:`gpu_ali3d.reconstruct`), FSC inside the mask (:mod:`gpu_ali3d.resolution`), prepare the
reference with the user function (:mod:`gpu_ali3d.user_functions`), then refine the poses of the chunk's images
(:mod:`gpu_ali3d.alignment`: one simplex per image, :mod:`gpu_ali3d.simplex`, on the Fourier-space objective,
:mod:`gpu_ali3d.score`). The last iteration only reconstructs.

Deliberate differences from SPARX, each stated where it happens: the simplex runs over all five parameters at
once (SPARX: three angles, shifts by a CCF peak search inside each evaluation); the objective is evaluated in
Fourier space up to the current resolution (where the reference's tanh filter falls to 10 %, as RELION
limits its search to the current resolution), not up to Nyquist, on the images' own M x M Fourier grid; half
sets follow ``rlnRandomSubset`` when the input has it.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import parallel
from .alignment import _device_bytes_per_image, _prepared_bytes_per_image, align_poses, alignment_batch
from .geometry import POSE_COLUMNS, angular_distance, rotation_matrix, shift_distance
from .io.atomic import atomic_path
from .io.formats import read_stack, read_volume, stack_format, write_poses, write_stack, write_volume
from .io.stack import ParticleStack, StreamedImages, check_refinable
from .options import RefineOptions
from .reconstruct import new_scratch

log = logging.getLogger("gpu_ali3d")


@dataclass
class IterationRecord:
    """One line of summary.json: what an iteration (or chunk) did."""
    iteration: int
    chunk: int
    criterion_before: float | None = None
    criterion_after: float | None = None
    fsc05_A: float | None = None
    fsc0143_A: float | None = None
    tanh_cutoff: float | None = None
    kmax_px: float | None = None
    mean_angle_change_deg: float | None = None
    mean_shift_change_px: float | None = None
    evaluations: int | None = None          # objective evaluations (image, pose pairs scored) of the alignment
    simplex_steps: float | None = None      # mean simplex steps per image
    reconstruct_s: float | None = None      # wall time of the reconstructions, FSC and reference preparation
    align_s: float | None = None            # wall time of the alignment
    snr: float | None = None                # the reconstruction's Wiener SNR (None: per-shell terms, --snr auto)
    wall_s: float = 0.0


@dataclass
class RefineResult:
    """What local_ali3d returns: final poses (n, 5) in gpu-ali3d's convention and the per-iteration records."""
    poses: np.ndarray
    records: list[IterationRecord] = field(default_factory=list)
    outdir: Path | None = None


def local_ali3d(stack, outdir, maskfile=None, *, options: RefineOptions | None = None, progress: bool = True,
                **overrides) -> RefineResult:
    """Local refinement of particle poses, SPARX ``local_ali3d`` semantics (options: :class:`RefineOptions`).

    stack : path of a particle stack (.hdf, .star, .cs) or a :class:`ParticleStack`. Never modified, except by
        ``write_headers=True`` after a successful run (a new file renamed over it; the old poses are kept in
        outdir/previous_poses.txt).
    outdir : output directory; must not exist (it is created).
    maskfile : 3-D mask (.hdf/.mrc) of the box size, or None for a sphere of radius ou.
    options / overrides : a RefineOptions, or its fields as keyword arguments (``ou=28, maxit=3, ...``).
    Writes vol/volf/resolution files per iteration and chunk, params_%03d.txt, particles.star, a refined copy of
    the stack in its own format, log.txt, summary.json, fsc.png and a checkpoint after every chunk
    (:func:`continue_local_ali3d` resumes from it).
    Under mpiexec/mpirun (:mod:`gpu_ali3d.parallel`) every rank calls this; each reads and aligns its own block of
    particles, rank 0 alone writes outdir, and an error on any rank stops all of them.
    """
    comm = parallel.world()
    with parallel.abort_on_error(comm):
        if options is not None and overrides:
            raise TypeError("give either options= or keyword overrides, not both")
        opts = options if options is not None else RefineOptions(**overrides)
        outdir = Path(outdir)
        parallel.on_root(comm, lambda: _check_new_outdir(outdir))
        source_path = None
        if not isinstance(stack, ParticleStack):
            source_path = Path(stack).resolve()
            stack = read_stack(source_path)
        if opts.write_headers:
            _check_headers_writable(source_path)
        setup = _setup(stack, opts, maskfile)
        opts = _resolve_function(opts)
        held = {}              # rank 0: outdir's lock, taken when it is made and held until the run ends

        def create():
            held["lock"] = _create_outdir(outdir, opts, source_path, maskfile,
                                          stack.poses if opts.write_headers else None,
                                          input_identity(stack, setup.half))
        parallel.on_root(comm, create)
        state = _State(poses=stack.poses.copy())
        try:
            return _with_log(outdir, lambda: _run(stack, source_path, outdir, opts, setup, state, progress,
                                                  comm=comm), comm)
        except BaseException:
            if comm.rank == 0:
                _remove_if_unstarted(outdir)
            raise
        finally:
            if "lock" in held:
                held["lock"].close()          # closing the file releases its flock


def continue_local_ali3d(outdir, *, progress: bool = True, **changes) -> RefineResult:
    """Resume an interrupted :func:`local_ali3d` from the checkpoint in outdir (written after every chunk).

    The options, input and mask are those of the original run (outdir/job.json); the result equals that of an
    uninterrupted run, because every step depends only on the poses and options saved in the checkpoint.
    changes : only ``device``, ``batch`` and ``debug`` may differ from the original run (where it runs, how it
    batches and reports; the poses depend on none of them). The input must be the one the run began with
    (:func:`input_identity`), and a 'file.py:callable' user function the very file (its sha256).
    """
    allowed = {"device", "batch", "debug"}
    if set(changes) - allowed:
        raise ValueError(f"--continue may change only {', '.join(sorted(allowed))}; got {', '.join(sorted(changes))}")
    comm = parallel.world()
    with parallel.abort_on_error(comm):
        outdir = Path(outdir)
        job = parallel.on_root(comm, lambda: _load_job(outdir))       # only rank 0 reads outdir
        opts = replace(job_options(job), **changes)
        if job["stack"] is None:
            raise ValueError(f"{outdir}: the run was given an in-memory stack; it cannot be resumed from files")
        # what would fail at the end (or at the first write) fails now, before any work
        parallel.on_root(comm, lambda: (_check_outdir_writable(outdir),
                                        _check_headers_writable(job["stack"]) if opts.write_headers else None))
        stack = read_stack(job["stack"])
        setup = _setup(stack, opts, job["maskfile"])
        parallel.on_root(comm, lambda: (_check_input_identity(job, stack, setup.half, outdir),
                                        _check_function_file(job, opts, outdir)))

        def load_state():
            state = (_State.load(outdir, len(stack)) if (outdir / CHECKPOINT).is_file()
                     else _State(poses=stack.poses.copy()))
            if state.done:
                raise ValueError(f"{outdir}: this refinement finished already; nothing to continue")
            return state

        with contextlib.ExitStack() as held:
            if comm.rank == 0:                 # before the checkpoint is read: one --continue at a time
                held.enter_context(_outdir_lock(outdir))
            state = parallel.on_root(comm, load_state)
            return _with_log(outdir, lambda: _run(stack, Path(job["stack"]), outdir, opts, setup, state, progress,
                                                  resumed=True, comm=comm), comm)


# ----------------------------------------------------------------------------------------------------- driver
CHECKPOINT = "checkpoint.npz"
#: With --write-headers: the input's poses before the run (written when outdir is made, never replaced).
PREVIOUS_POSES = "previous_poses.txt"


@dataclass
class _Setup:
    ou: int
    mask: np.ndarray        # the mask file's, or the sphere of radius ou
    half: np.ndarray
    ctf: object
    automask: float = 0.0   # > 0: the sphere is narrowed to the map's envelope each iteration (masking.adaptive_mask)
    mask_text: str = "sphere"   # what the start line says of the mask


@dataclass
class _State:
    """What the loop needs to go on: poses, where to resume (iteration, chunk), records and FSC curves so far."""
    poses: np.ndarray
    next_iteration: int = 0
    next_chunk: int = 0
    records: list = field(default_factory=list)
    curves: list = field(default_factory=list)       # (iteration, chunk, FSCCurve)
    done: bool = False

    def save(self, outdir: Path) -> None:
        curves = {f"curve_{i}_{c}": np.stack(cv[:3]) for i, c, cv in self.curves}
        meta = json.dumps({"next_iteration": self.next_iteration, "next_chunk": self.next_chunk, "done": self.done,
                           "records": [asdict(r) for r in self.records]})
        with atomic_path(outdir / CHECKPOINT, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, poses=self.poses, meta=np.array(meta), **curves)

    @classmethod
    def load(cls, outdir: Path, n: int) -> "_State":
        from .resolution import FSCCurve

        try:
            with np.load(outdir / CHECKPOINT) as z:
                meta = json.loads(str(z["meta"]))
                poses = z["poses"]
                curves = []
                for rec in meta["records"]:
                    key = f"curve_{rec['iteration']}_{rec['chunk']}"
                    curves.append((rec["iteration"], rec["chunk"], FSCCurve(*z[key])))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:   # damaged after it was written
            raise ValueError(f"{outdir / CHECKPOINT}: unreadable checkpoint ({' '.join(str(exc).split())}); the run "
                             "cannot be resumed from it: start a new run") from None
        if poses.shape != (n, 5):
            raise ValueError(f"{outdir / CHECKPOINT}: {len(poses)} poses for a stack of {n} particles")
        records = [IterationRecord(**r) for r in meta["records"]]
        return cls(poses=poses, next_iteration=meta["next_iteration"], next_chunk=meta["next_chunk"],
                   records=records, curves=curves, done=meta["done"])


def _setup(stack: ParticleStack, opts: RefineOptions, maskfile) -> _Setup:
    ou = opts.outer_radius(stack.box)
    check_refinable(stack, ctf=opts.CTF)     # poses present; --CTF only where the CTF can be applied
    if opts.CTF and stack.ctf is None:
        raise ValueError("--CTF given but the stack has no CTF parameters")
    return _Setup(ou=ou, mask=_mask(maskfile, stack.box, ou), half=_half_sets(stack, opts.seed),
                  ctf=stack.ctf if opts.CTF else None, automask=opts.automask if maskfile is None else 0.0,
                  mask_text=(Path(maskfile).name if maskfile is not None
                             else f"automask {opts.automask:g}" if opts.automask > 0 else "sphere"))


def _check_new_outdir(outdir: Path) -> None:
    """Refuse, before any work, an outdir that exists or that could not be a folder (a part of its path is a file)."""
    if outdir.exists():
        raise FileExistsError(f"{outdir}: output directory already exists; choose a new name "
                              "(or resume it with --continue)")
    above = outdir.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise NotADirectoryError(f"{outdir}: cannot be an output directory: {above} is a file, not a folder; "
                                 "choose another OUTDIR")


def _create_outdir(outdir: Path, opts: RefineOptions, source_path, maskfile, original_poses=None,
                   identity=None):
    """Make outdir with job.json; with --write-headers (original_poses given) also previous_poses.txt, the input's
    poses as they were before anything ran. It is written once, here, and never again: a run killed after the
    input was replaced and then resumed (which reads the replaced input) cannot overwrite it.

    The folder is filled under a hidden name beside outdir ('.NAME.new-*') and renamed to outdir in one step, so a
    kill leaves either no outdir (the same command runs again; the next run removes the hidden folder) or one
    that --continue resumes. Returns outdir's lock file, open and locked (:func:`_lock`): the caller holds it
    for the whole run and closes it at the end."""
    parent = outdir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_creations(outdir)
        staging = parent / f".{outdir.name}.new-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as exc:
        raise PermissionError(f"{outdir}: cannot create the output directory: {parent} does not take new folders "
                              f"({exc.strerror or exc}); choose an OUTDIR where you can write") from None
    lock = None
    try:
        lock = _lock(staging)                 # nobody else knows this name: it cannot be busy
        if original_poses is not None:
            _write_params(staging / PREVIOUS_POSES, original_poses, overwrite=False)
        _save_job(staging, opts, source_path, maskfile, identity)
        if outdir.exists():
            raise FileExistsError(outdir)
        try:
            os.rename(staging, outdir)
        except OSError:
            raise FileExistsError(outdir) from None
    except BaseException as exc:
        if lock is not None:
            lock.close()
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, FileExistsError) and str(exc) == str(outdir):    # made since the check: another run
            raise FileExistsError(f"{outdir}: another run created this output directory just now; choose another "
                                  "name") from None
        if isinstance(exc, OSError) and exc.strerror and str(exc.filename).startswith(str(staging)):
            # a full disk writing job.json: name the file the user asked for, not the hidden folder
            raise OSError(exc.errno, exc.strerror, str(outdir) + str(exc.filename)[len(str(staging)):]) from None
        raise
    return lock


def _remove_abandoned_creations(outdir: Path) -> None:
    """Remove the hidden '.NAME.new-*' folders beside outdir that runs killed while making it left
    (:func:`_create_outdir`): those whose lock no live run holds."""
    for folder in outdir.parent.glob(f".{glob.escape(outdir.name)}.new-*"):
        if not (folder / LOCK).is_file():
            continue                          # not one of ours, or its run is between mkdir and lock: leave it
        try:
            with _lock(folder):
                shutil.rmtree(folder, ignore_errors=True)
        except (RuntimeError, OSError):       # a live run is still making it, or it went meanwhile
            continue


def _remove_if_unstarted(outdir: Path) -> None:
    """A run that fails (or is interrupted) before its first checkpoint has nothing to resume: remove the outdir
    it created, so that the same command can simply be run again. One with a checkpoint is kept for --continue."""
    if outdir.is_dir() and not (outdir / CHECKPOINT).exists():
        shutil.rmtree(outdir, ignore_errors=True)


def _check_headers_writable(source_path) -> None:
    """--write-headers replaces the input by a new file renamed over it: refuse at the start (and at every
    --continue), not after the whole refinement, when the input is not a regular file, is read-only (no write
    permission, or none for anyone: root could write it, but the owner marked it so), its folder takes no new
    file, or that folder's file system has no room for the new one (about the input's size)."""
    if source_path is None:
        raise ValueError("write_headers needs a stack given as a file path")
    source = Path(source_path)
    folder = source.parent
    advice = "copy the input somewhere writable, or leave out --write-headers"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: --write-headers replaces the input file, and there is none here")
    if not os.access(source, os.W_OK) or not source.stat().st_mode & 0o222:
        raise PermissionError(f"{source}: --write-headers cannot replace it: the file is read-only; make it "
                              f"writable (chmod u+w), {advice}")
    problem = _write_probe(folder)
    if problem is not None:
        raise PermissionError(f"{source}: --write-headers cannot replace it: its folder {folder} does not "
                              f"take new files ({problem.strerror or problem}); {advice}")
    needed = int(1.1 * source.stat().st_size) + 2**20      # the new file, a little larger (more columns)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(f"{source}: --write-headers cannot replace it: the new file needs about "
                      f"{needed / 2**20:.1f} MiB beside it and {folder} has {free / 2**20:.1f} MiB free; free some "
                      f"space, {advice}")


def _check_outdir_writable(outdir: Path) -> None:
    """--continue writes its outputs into outdir: refuse at the start when the folder takes no new files."""
    problem = _write_probe(outdir)
    if problem is not None:
        raise PermissionError(f"{outdir}: --continue cannot write its outputs here: the folder does not take new "
                              f"files ({problem.strerror or problem}); make it writable, or copy it somewhere "
                              "writable and --continue the copy")


def _write_probe(folder: Path) -> OSError | None:
    """None when folder takes a new file; else the OSError. A real write: os.access says yes to root on a read-only
    file system."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".gpu-ali3d-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc
    return None


#: What a run recorded before an option existed did, for a job.json without it: before --automask the FSC and the
#: reference were masked by the sphere alone, before --objective the alignment used the plain correlation.
OPTIONS_BEFORE_THEY_EXISTED = {"automask": 0.0, "objective": "plain"}


def job_options(job: dict) -> RefineOptions:
    """The RefineOptions of a job.json (:func:`_load_job`), with :data:`OPTIONS_BEFORE_THEY_EXISTED` for the
    options it does not record, so that a continued run goes on as it began."""
    return RefineOptions(**{**OPTIONS_BEFORE_THEY_EXISTED, **job["options"]})


def _load_job(outdir: Path) -> dict:
    job_path = outdir / "job.json"
    if not job_path.is_file():
        raise FileNotFoundError(f"{outdir}: no job.json here; is this a gpu-ali3d refine output directory?")
    try:
        job = json.loads(job_path.read_text())
        if not isinstance(job, dict) or not isinstance(job.get("options"), dict):
            raise ValueError("no 'options' entry")
        for key in ("stack", "maskfile"):             # a path, or null (an in-memory stack; the default mask)
            if not isinstance(job.get(key, 0), (str, type(None))):
                raise ValueError(f"no '{key}' entry" if key not in job else f"'{key}' is not a path")
        RefineOptions(**job["options"])
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{job_path}: not a readable gpu-ali3d job file ({' '.join(str(exc).split())})") from None
    return job


def _save_job(outdir: Path, opts: RefineOptions, source_path, maskfile, identity=None) -> None:
    job = {"options": {k: getattr(opts, k) for k in RefineOptions.field_names()},
           "stack": None if source_path is None else str(source_path),
           "maskfile": None if maskfile is None else str(Path(maskfile).resolve()),
           "input": identity, "function_sha256": _function_file_sha256(opts.function)}
    with atomic_path(outdir / "job.json") as tmp:
        tmp.write_text(json.dumps(job, indent=1))


def input_identity(stack: ParticleStack, half: np.ndarray) -> dict:
    """What --continue checks the input against (job.json "input"): particle count, box, pixel size and a sha256 of
    the metadata a refinement depends on besides the poses (CTF parameters, image references in order, and the
    half sets as used, ``half``: an input without rlnRandomSubset that --write-headers rewrote with the ones drawn
    is the same input). The poses are left out (the checkpoint carries them, and --write-headers replaces them),
    and so are the pixels (reading every image to hash it would cost a pass over the data)."""
    from dataclasses import fields as dc_fields

    h = hashlib.sha256()
    if stack.ctf is not None:
        for f in dc_fields(stack.ctf):
            h.update(np.ascontiguousarray(getattr(stack.ctf, f.name), np.float64).tobytes())
    h.update("\n".join(stack.image_refs or []).encode())
    h.update(np.asarray(half).astype(np.int64).tobytes())
    return {"particles": len(stack), "box": int(stack.box), "apix_A": float(stack.apix_A),
            "metadata_sha256": h.hexdigest()}


def _check_input_identity(job: dict, stack: ParticleStack, half: np.ndarray, outdir: Path) -> None:
    saved = job.get("input")
    if saved is None:                       # a job.json from before the check existed
        return
    now = input_identity(stack, half)
    changed = [k for k in ("particles", "box", "apix_A", "metadata_sha256") if saved.get(k) != now[k]]
    if changed:
        what = {"particles": "particle count", "box": "box", "apix_A": "pixel size",
                "metadata_sha256": "CTF, image order or half sets"}
        raise ValueError(f"{job['stack']}: the input changed since {outdir} was started (its "
                         f"{', '.join(what[k] for k in changed)}); --continue needs the run's own input: restore it, "
                         "or start a new run")


def _function_file_sha256(spec: str) -> str | None:
    """sha256 of a 'file.py:callable' user function's file, or None for built-ins and modules."""
    path, _, _name = spec.rpartition(":")
    if not path.endswith(".py") or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resolve_function(opts: RefineOptions) -> RefineOptions:
    """A 'file.py:callable' --function with its path made absolute, so --continue from another folder loads the
    same file (job.json stores the resolved form)."""
    path, _, name = opts.function.rpartition(":")
    if path.endswith(".py"):
        return replace(opts, function=f"{Path(path).resolve()}:{name}")
    return opts


def _check_function_file(job: dict, opts: RefineOptions, outdir: Path) -> None:
    """--continue runs the user function named in job.json: only the very file the run was started with, and never
    one that lives inside the output folder (a copied OUTDIR must not bring code of its own)."""
    path, _, _name = opts.function.rpartition(":")
    if not path.endswith(".py"):
        return
    file = Path(path)
    if not file.is_absolute():
        raise ValueError(f"{outdir / 'job.json'}: --function {opts.function!r} is a relative path; --continue needs "
                         "the absolute path that gpu-ali3d records")
    if outdir.resolve() in file.resolve().parents:
        raise ValueError(f"{outdir / 'job.json'}: --function {opts.function!r} lies inside the output folder; "
                         "refusing to run code that came with an output folder")
    sha = _function_file_sha256(opts.function)
    if sha is not None and job.get("function_sha256") not in (None, sha):
        raise ValueError(f"--function {file}: the file changed since {outdir} was started; --continue needs the "
                         "run's own user function: restore it, or start a new run")


def _with_log(outdir: Path, body, comm=None):
    """Run body with log.txt attached (rank 0). The caller holds outdir's lock (:func:`_lock`)."""
    if comm is not None and comm.rank != 0:          # only rank 0 writes outdir (and log.txt)
        return body()
    return _logged(outdir, body)


LOCK = ".gpu-ali3d.lock"


def _lock(folder: Path):
    """Open folder's lock file and take an exclusive lock on it (flock), so that two runs (two --continue of one
    folder) cannot both write it: the second is refused at once, naming the folder. Returns the open file; the
    lock lasts until it is closed (also by a kill)."""
    import fcntl

    try:
        f = open(folder / LOCK, "a+")
    except OSError as exc:
        raise PermissionError(f"{folder}: cannot write in this output directory ({exc.strerror or exc}); make it "
                              "writable, or copy it somewhere writable") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"{folder}: another gpu-ali3d run is using this output directory; wait for it to "
                           "end (or stop it), then --continue") from None
    return f


@contextlib.contextmanager
def _outdir_lock(outdir: Path):
    """Hold outdir's lock (:func:`_lock`) for the body."""
    with _lock(outdir):
        yield


def _tidy_for_resume(outdir: Path, state: "_State", source_path: Path | None = None) -> None:
    """Before a resumed run goes on: remove the temporaries a killed run left (atomic writes' hidden '.NAME.*'
    files; with --write-headers, ``source_path`` given, also the one beside the input), make summary.json say
    what the checkpoint says (a kill between the two renames leaves it a chunk behind, and a run resumed after
    its last chunk writes no other), and drop the --debug lines of the chunks it will redo (those at or after
    the checkpoint's position), so progress.txt holds each chunk once."""
    for tmp in outdir.glob(".*"):
        if tmp.name != LOCK and tmp.is_file():
            tmp.unlink()
    if source_path is not None:          # atomic_path's name for the new input: '.NAME.' + 8 characters + suffix
        name = re.compile(rf"\.{re.escape(source_path.name)}\.[a-z0-9_]{{8}}{re.escape(source_path.suffix)}")
        for tmp in source_path.parent.glob(f".{glob.escape(source_path.name)}.*"):
            if name.fullmatch(tmp.name) and tmp.is_file():
                tmp.unlink()
    if state.records:
        _write_json(outdir / "summary.json", [asdict(r) for r in state.records])
    progress = outdir / "progress.txt"
    if progress.is_file():
        keep = [line for line in progress.read_text().splitlines(keepends=True)
                if tuple(int(v) for v in line.split()[:2]) < (state.next_iteration, state.next_chunk)]
        with atomic_path(progress, overwrite=True) as tmp:
            tmp.write_text("".join(keep))


def _logged(outdir: Path, body):
    handler = logging.FileHandler(outdir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return body()
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(stack, source_path, outdir, opts, setup: _Setup, state: _State, progress, resumed=False,
         comm=None) -> RefineResult:
    from .user_functions import load_user_function

    comm = parallel.SerialComm() if comm is None else comm
    root = comm.rank == 0
    say = _say if root else (lambda text: None)           # rank 0 alone prints and logs
    progress = progress and root
    user_function = load_user_function(opts.function)
    backend = None
    if opts.device != "reference":
        from .backend import make_backend
        backend = make_backend(opts.device)
        parallel.select_device(backend, comm)   # one GPU per rank: node-local rank -> device
        for module in ("align", "insert"):      # compile (or find in the cache) before the first iteration
            backend.kernels.load(module)
    n, box, apix = len(stack), stack.box, stack.apix_A
    ou, half, ctf = setup.ou, setup.half, setup.ctf
    if resumed and root:
        _tidy_for_resume(outdir, state, source_path if opts.write_headers else None)
    if resumed:
        say(f"resuming at iteration {state.next_iteration + 1}, chunk {state.next_chunk + 1}")
    say(f"gpu-ali3d local refinement: {n} particles, box {box}, {apix:g} A/px, ou {ou}, delta {opts.delta:g}, "
        f"ts {opts.ts:g}, maxit {opts.maxit}, chunk {opts.chunk:g}, CTF {'on' if ctf is not None else 'off'}, "
        f"sym {opts.sym}, objective {alignment_objective(opts, box, ou)[1]}, interpolation {opts.interpolation}, "
        f"insertion {opts.insertion}, "
        f"snr {'auto' if opts.snr is None else opts.snr if isinstance(opts.snr, str) else f'{opts.snr:g}'}, "
        f"mask {setup.mask_text}, device {backend.name if backend else 'reference'}")
    say(f"memory estimate: {memory_estimate_bytes(n, box, opts, streamed=_streamed(n, box, opts)) / 2**20:.0f} MiB")
    free = backend.free_memory_bytes() if backend is not None else None
    if free is not None:
        say(f"device memory estimate: {device_memory_estimate_bytes(n, box, opts, free) / 2**20:.0f} MiB "
            f"({free / 2**20:.0f} MiB free)")
    lo, hi = parallel.block(n, comm.rank, comm.size)      # this rank's particles; it reads only their images
    if comm.size > 1:
        say(f"MPI: {comm.size} ranks, {hi - lo} particles on rank 0")
    images = _rank_images(stack, lo, hi, opts, backend, say)
    # the insertion's fixed-point grid, kept over the iterations (insert_unscale leaves it zeroed)
    scratch = None if backend is None else new_scratch(backend, opts.npad * box)
    poses = state.poses
    aligns = state.next_iteration < opts.maxit
    spectrum = noise_spectrum(stack, ou, opts, comm, outdir if root else None) if aligns else None
    # the images prepared once for the alignment (None: prepared per batch), when this run still aligns
    full_band = (_full_band(images, None if ctf is None else ctf[lo:hi], apix, ou, opts, backend, say,
                            noise_spectrum=spectrum) if aligns else None)
    chunks = _chunks(n, opts.chunk)
    for iteration in range(state.next_iteration, opts.maxit + 1):
        last = iteration == opts.maxit
        first_chunk = state.next_chunk if iteration == state.next_iteration else 0
        for ic in range(first_chunk, len(chunks)):
            members = chunks[ic]
            t0 = time.perf_counter()
            rec = IterationRecord(iteration, ic)
            if opts.center == -1:
                poses = parallel.on_root(comm, lambda: centre_data(poses))   # one answer for every rank
            rec.snr = reconstruction_snr(opts, state.records)
            volf, curve, (cutoff, falloff) = _reference(images, poses, half, ctf, apix, setup, opts, user_function,
                                                        backend, outdir, iteration, ic, snr=rec.snr, comm=comm, first=lo,
                                                        final=last and ic == len(chunks) - 1, scratch=scratch)
            rec.reconstruct_s = time.perf_counter() - t0
            state.curves.append((iteration, ic, curve))
            rec.fsc05_A, rec.fsc0143_A = _resolutions(curve, apix)
            rec.tanh_cutoff = cutoff
            if not last:
                old = poses[members].copy()
                mine = members[(members >= lo) & (members < hi)]          # this rank's part of the chunk
                t1 = time.perf_counter()
                new, before, after, kmax, work = align_poses(_select(images, mine - lo, backend), poses[mine], volf,
                                                             ctf[mine] if ctf is not None else None,
                                                             apix, ou, opts, cutoff, falloff, backend, progress,
                                                             f"iteration {iteration + 1}/{opts.maxit}",
                                                             full_band=full_band, rows=mine - lo,
                                                             noise_spectrum=spectrum)
                if comm.size > 1:       # blocks are contiguous and in rank order: concatenation is chunk order
                    new, before, after = (np.concatenate(comm.allgather(a)) for a in (new, before, after))
                    work = np.sum(comm.allgather(work), axis=0)
                poses[members] = new
                rec.align_s = time.perf_counter() - t1
                rec.kmax_px = kmax
                rec.evaluations = int(work[0])
                rec.simplex_steps = float(work[1]) / max(1, len(members))
                rec.criterion_before, rec.criterion_after = float(before.mean()), float(after.mean())
                rec.mean_angle_change_deg = float(angular_distance(old, new).mean())
                rec.mean_shift_change_px = float(shift_distance(old, new).mean())
                if opts.debug and root:
                    _write_debug(outdir, iteration, ic, members, old, new, before, after)
            rec.wall_s = time.perf_counter() - t0
            state.records.append(rec)
            say(_summary_line(rec, opts.maxit))
            state.poses = poses
            state.next_iteration, state.next_chunk = (iteration, ic + 1) if ic + 1 < len(chunks) else (iteration + 1, 0)
            if root:
                if ic == len(chunks) - 1 and not last:
                    _write_params(outdir / f"params_{iteration:03d}.txt", poses)
                state.save(outdir)
                _write_json(outdir / "summary.json", [asdict(r) for r in state.records])
    refined = ParticleStack(images=stack.images, poses=poses, apix_A=stack.apix_A, ctf=stack.ctf,
                            image_refs=stack.image_refs,
                            meta={**stack.meta, "rlnRandomSubset": setup.half + 1})   # the half sets used
    state.done = True
    if not root:
        return RefineResult(poses=poses, records=state.records, outdir=outdir)
    _plot_fsc(outdir / "fsc.png", state.curves, apix)
    write_stack(refined, outdir / "particles.star", overwrite=True)
    if source_path is not None and stack_format(source_path) != "star":
        write_stack(refined, outdir / f"refined{source_path.suffix}", overwrite=True)
    if opts.write_headers:
        _write_headers(source_path, stack, refined, outdir)
    state.save(outdir)
    say(f"done: final poses in {outdir / 'particles.star'}")
    return RefineResult(poses=poses, records=state.records, outdir=outdir)


def _write_headers(source_path: Path, original: ParticleStack, refined: ParticleStack, outdir: Path) -> None:
    """--write-headers: replace the input by a new file with the refined poses (written beside it and renamed over
    it: the input is whole at every moment). A STAR or .cs input keeps all but its pose columns and half sets, its
    image paths included (:func:`io.formats.write_poses`). The input's original poses were saved in
    outdir/previous_poses.txt when outdir was made (:func:`_create_outdir`); an output directory from before that
    has them written now, from ``original``, only if the file is missing."""
    previous = outdir / PREVIOUS_POSES
    if not previous.is_file():
        _write_params(previous, original.poses, overwrite=False)
    write_poses(refined, source_path)
    _say(f"wrote the refined poses into {source_path} (previous poses: {previous})")


def _reference(images, poses, half, ctf, apix, setup, opts, user_function, backend, outdir, iteration, ic, *,
               snr: float | None, comm=None, first=0, final=False, scratch=None):
    """Half maps, masked FSC, full map and the user function's reference; writes vol, volf and resolution.
    The mask of the FSC and of the user function is setup.mask, narrowed to the full map's envelope when
    setup.automask > 0 (:func:`gpu_ali3d.masking.adaptive_mask`; written as mask.mrc with the final maps).
    backend None: numpy reference insertion; else kernels/insert.cu (deterministic mode) on that backend.
    MPI (comm of several ranks): images are this rank's block, particles first .. first + len(images) - 1 of the
    global poses, half and ctf; the half-set accumulators are summed on rank 0 (:func:`parallel.reduce_accumulator`,
    fixed order), which finishes, filters and writes, and every rank gets the same (volf, curve, tanh fit).
    final: the last reconstruction of the run; its maps are also written as map.mrc and map_filtered.mrc.
    scratch: the insertion's zeroed fixed-point grid (reconstruct.new_scratch) to reuse, or None.
    snr: the Wiener constant's SNR (:func:`reconstruction_snr`), or None for per-shell terms from the FSC."""
    from .masking import adaptive_mask
    from .reconstruct import accumulate_halves, finish, insert_chunk, wiener_regularisation
    from .resolution import fit_tanh, fsc_mask, fsc_text
    from .user_functions import call_user_function

    comm = parallel.SerialComm() if comm is None else comm
    if comm.size > 1:
        mine = slice(first, first + len(images))
        poses, half, ctf = poses[mine], half[mine], (None if ctf is None else ctf[mine])
    # one rank: the accumulators stay on the device and are finished there (only the M^3 maps come back); several:
    # host copies, summed over the ranks (DESIGN.md, MPI) and finished on rank 0's host
    on_device = backend is not None and comm.size == 1
    accs = accumulate_halves(images, poses, half=half, ctf=ctf, apix_A=apix, snr=snr, sym=opts.sym,
                             npad=opts.npad, backend=backend, insertion=opts.insertion, on_device=on_device,
                             chunk=insert_chunk(images.shape[-1], opts.npad, opts.insertion), scratch=scratch)
    accs = [parallel.reduce_accumulator(acc, comm) for acc in accs]       # None off rank 0
    where = backend if on_device else None

    def prepare():
        # --snr: SPARX's constant; else per-shell Wiener terms from the half sets (reconstruct.wiener_regularisation)
        lam = None if snr is not None else wiener_regularisation(accs[0], accs[1], backend=where)
        even = finish(accs[0], regularisation=lam, backend=where)
        odd = finish(accs[1], regularisation=lam, backend=where)
        full = finish(accs[0], plus=accs[1], regularisation=lam, backend=where)
        mask = (setup.mask if setup.automask <= 0
                else adaptive_mask(full, apix, setup.mask, threshold=setup.automask))
        curve = fsc_mask(even, odd, mask)
        tag = f"{iteration:03d}_{ic:03d}"
        with atomic_path(outdir / f"resolution{tag}", overwrite=True) as tmp:
            tmp.write_text(fsc_text(curve))
        write_volume(outdir / f"vol{tag}.hdf", full.astype(np.float32), apix, overwrite=True)
        volf, _centre = call_user_function(user_function, opts.function,
                                           [mask, opts.center if opts.center == 1 else 0, full, curve], full.shape[0])
        write_volume(outdir / f"volf{tag}.hdf", volf.astype(np.float32), apix, overwrite=True)
        if final:           # the result as MRC too, for ChimeraX, RELION and the rest
            write_volume(outdir / "map.mrc", full.astype(np.float32), apix, overwrite=True)
            write_volume(outdir / "map_filtered.mrc", volf.astype(np.float32), apix, overwrite=True)
            write_volume(outdir / "mask.mrc", mask.astype(np.float32), apix, overwrite=True)
        return volf, curve, fit_tanh(curve)

    if comm.size == 1:
        return prepare()
    kept = {}

    def prepare_on_root():
        kept["volf"], curve, tanh = prepare()
        return curve, tanh

    curve, tanh = parallel.on_root(comm, prepare_on_root)
    volf = parallel.bcast_array(kept.get("volf"), comm)                   # chunked: no pickle of a large map
    return volf, curve, tanh


def reconstruction_snr(opts: RefineOptions, records: list[IterationRecord]) -> float | None:
    """The SNR of the next reconstruction's Wiener constant: ``opts.snr`` when it is a number (SPARX's fixed
    constant) or None (``--snr auto``: per-shell terms, returned as None); for ``--snr measured``, the mean score
    of the last alignment in ``records`` through :func:`gpu_ali3d.reconstruct.snr_from_score` (1 before the first).
    Only the records decide it, so a resumed run and every MPI rank (whose records are the same) get the same."""
    from .options import SNR_MEASURED
    from .reconstruct import snr_from_score

    if opts.snr != SNR_MEASURED:
        return None if opts.snr is None else float(opts.snr)
    scores = [r.criterion_after for r in records if r.criterion_after is not None]
    return snr_from_score(scores[-1] if scores else None)


# --------------------------------------------------------------------------------------------- image helpers
#: A GPU run keeps a rank's images on the device for the whole run when they take at most this fraction of its
#: free memory (the reconstruction's grids and the alignment's batches need the rest).
RESIDENT_IMAGES_FRACTION = 0.25


def _rank_images(stack: ParticleStack, lo: int, hi: int, opts: RefineOptions, backend, say):
    """Particles lo..hi-1 of the stack as the run reads them: read into memory (then on a GPU's device when they fit:
    :func:`_resident_images`) when their float32 bytes fit the image budget (``opts.image_budget`` MiB; 0: half
    the available host memory), else an io.stack.StreamedImages that the reconstruction and the alignment read
    chunk by chunk and batch by batch from the files (issue 12: stacks larger than memory)."""
    if _streamed(hi - lo, stack.box, opts):
        say(f"images: {(hi - lo) * stack.box ** 2 * 4 / 2**20:.0f} MiB, more than the image budget of "
            f"{image_budget_bytes(opts) / 2**20:.0f} MiB; they are read from the files batch by batch")
        return StreamedImages(stack.images, np.arange(lo, hi))
    return _resident_images(stack.read_images(slice(lo, hi)), backend, say)


def _streamed(n: int, box: int, opts: RefineOptions) -> bool:
    """Whether n float32 images of the box exceed the run's image budget (:func:`image_budget_bytes`)."""
    budget = image_budget_bytes(opts)
    return budget is not None and n * box * box * 4 > budget


def image_budget_bytes(opts: RefineOptions) -> int | None:
    """The image budget of a run in bytes: --image-budget MiB, or half the available host memory (None where it
    cannot be read: no limit)."""
    if opts.image_budget > 0:
        return opts.image_budget << 20
    available = _available_host_bytes()
    return None if available is None else available // 2


def _resident_images(images: np.ndarray, backend, say):
    """The rank's images where the kernels read them: on a GPU one float32 copy on the device, made once and kept
    for the run (the reconstruction and the alignment both read it: no upload per iteration), when it fits
    :data:`RESIDENT_IMAGES_FRACTION` of the free device memory; else, and on the CPU, the host array (a GPU then
    uploads each batch and chunk as it goes)."""
    if backend is None or backend.xp is np:
        return images
    free = backend.free_memory_bytes()
    nbytes = int(np.prod(images.shape)) * 4
    if free is not None and nbytes > RESIDENT_IMAGES_FRACTION * free:
        say(f"images: {nbytes / 2**20:.0f} MiB, more than {RESIDENT_IMAGES_FRACTION:.0%} of the device's free "
            f"{free / 2**20:.0f} MiB; they go up batch by batch")
        return images
    return backend.xp.asarray(np.asarray(images, dtype=np.float32))


#: The alignment keeps the rank's images prepared at every frequency for the run (alignment.FullBandImages) when
#: they take at most this fraction of the available host memory (CPU) or of the free device memory (GPU).
FULL_BAND_FRACTION = 0.25


def alignment_objective(opts: RefineOptions, box: int, ou: int) -> tuple[str, str]:
    """The objective a run aligns with, "plain" or "whitened", and its words for the start line: --objective as
    given, or for "auto" whitened where a box-pixel image leaves noise.MIN_BACKGROUND_PIXELS background pixels
    beyond the mask of radius ou and its edge (the noise estimate's need), else plain."""
    from .noise import MIN_BACKGROUND_PIXELS, background_pixels
    from .score import MASK_EDGE_PX

    if opts.objective != "auto":
        return opts.objective, opts.objective
    pixels = background_pixels(box, ou, MASK_EDGE_PX)
    if pixels >= MIN_BACKGROUND_PIXELS:
        return "whitened", "whitened (auto)"
    return "plain", (f"plain (auto: a mask of radius {ou} leaves {pixels} background pixels in the box, fewer than "
                     f"the {MIN_BACKGROUND_PIXELS} the noise estimate needs)")


def noise_spectrum(stack: ParticleStack, ou: int, opts: RefineOptions, comm=None,
                   outdir: Path | None = None) -> np.ndarray | None:
    """The noise power per ring that whitens the objective (:func:`alignment_objective` whitened), or None (plain).

    Estimated from the background of an evenly spaced subset of the whole stack (:func:`gpu_ali3d.noise.subset_rows`,
    at most noise.MAX_IMAGES images, read here) by :func:`gpu_ali3d.noise.background_spectrum`, on the root only and
    broadcast: every rank, for any number of ranks, whitens by the same spectrum. outdir (the root's): the spectrum
    is also written there as noise_spectrum.txt (ring, resolution in A, relative power)."""
    from .noise import background_spectrum, spectrum_text, subset_rows
    from .score import MASK_EDGE_PX

    if alignment_objective(opts, stack.box, ou)[0] != "whitened":
        return None

    def estimate():
        rows = subset_rows(len(stack))
        spectrum = background_spectrum(StreamedImages(stack.images, rows), ou, MASK_EDGE_PX)      # read in blocks
        if outdir is not None:
            with atomic_path(outdir / "noise_spectrum.txt", overwrite=True) as tmp:
                tmp.write_text(spectrum_text(spectrum, stack.box, stack.apix_A))
        return spectrum

    return parallel.on_root(parallel.SerialComm() if comm is None else comm, estimate)


def _full_band(images, ctf, apix: float, ou: float, opts: RefineOptions, backend, say, *,
               noise_spectrum: np.ndarray | None = None):
    """The rank's images prepared once for the alignment (alignment.prepare_full_band), or None (prepare them per
    batch, each iteration) for the numpy reference path, a rank without particles, streamed images (beyond the
    budget already) and where they would take more than :data:`FULL_BAND_FRACTION` of the memory available where
    they would live."""
    from .alignment import full_band_bytes, prepare_full_band

    if backend is None or len(images) == 0 or isinstance(images, StreamedImages):
        return None
    nbytes = full_band_bytes(len(images), images.shape[-1])
    free = backend.free_memory_bytes() if backend.xp is not np else _available_host_bytes()
    if free is not None and nbytes > FULL_BAND_FRACTION * free:
        say(f"alignment: the images prepared once would take {nbytes / 2**20:.0f} MiB, more than "
            f"{FULL_BAND_FRACTION:.0%} of the {free / 2**20:.0f} MiB available; they are prepared each iteration")
        return None
    return prepare_full_band(images, ctf, apix, ou, backend, batch=opts.batch, noise_spectrum=noise_spectrum)


def _available_host_bytes() -> int | None:
    """Memory the host can give now (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _select(images, index: np.ndarray, backend):
    """images[index] (int array), on whichever side the images are: a slice when the indices are a run (a chunk
    of the rank's own block, the usual case), else a gather with the indices sent to the device."""
    if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        return images[int(index[0]):int(index[0]) + len(index)]
    if isinstance(images, (np.ndarray, StreamedImages)):
        return images[np.asarray(index, dtype=np.int64)]
    return images[backend.xp.asarray(index)]


# --------------------------------------------------------------------------------------------- pose helpers
def centre_data(poses: np.ndarray) -> np.ndarray:
    """center = -1: remove the average 3-D centre of the data from every image's shift.

    The 2-D shifts (sx, sy) are fitted, by least squares, as the projections ``(R_i t)[:2]`` of one 3-D offset t of
    the map (pixels); t is then removed from every image. A pure global offset is removed exactly, and images
    spread over many directions make the fit well-posed, so repeated centring does not drift (t ~ 0 once centred).
    """
    r = rotation_matrix(poses[:, 0], poses[:, 1], poses[:, 2])[:, :2, :]      # (n, 2, 3)
    t, *_ = np.linalg.lstsq(r.reshape(-1, 3), poses[:, 3:5].reshape(-1), rcond=None)
    out = poses.copy()
    out[:, 3:5] -= r @ t
    return out


def device_memory_estimate_bytes(n: int, box: int, opts: RefineOptions, device_free: int) -> int:
    """GPU memory a run needs at most: one half-set accumulator with its fixed-point scratch (complex128 and
    float64 on the padded half grid, twice), the band-limited reference (at most the whole padded cube, complex64)
    and one alignment batch (:func:`alignment_batch` with ``device_free``)."""
    npad_box = opts.npad * box
    accumulator = 2 * npad_box ** 2 * (npad_box // 2 + 1) * (16 + 8)
    reference = (2 * box + 7) ** 2 * (box + 7) * 8
    batch = alignment_batch(n, box, opts.batch, device_free=device_free) * _device_bytes_per_image(box)
    return accumulator + reference + batch


def memory_estimate_bytes(n: int, box: int, opts: RefineOptions, *, streamed: bool = False) -> int:
    """Host memory a run needs: images, the padded Fourier accumulators, the prepared reference, one alignment
    batch of prepared images (float64/complex128), one insertion call's images, their float64 temporaries and
    slice transforms (complex64 and float32 CTF^2 on the plane that is inserted) and the images prepared once for
    the alignment (alignment.full_band_bytes; kept when they fit :data:`FULL_BAND_FRACTION` of the available memory).
    streamed: the images beyond the image budget (read as needed: neither they nor the prepared ones are held)."""
    from .alignment import full_band_bytes
    from .reconstruct import insert_chunk

    npad_box = opts.npad * box
    images = 0 if streamed else n * box * box * 4
    accumulators = 4 * npad_box ** 2 * (npad_box // 2 + 1) * (16 + 8)    # two halves, their sum, scratch
    reference = (2 * box + 7) ** 2 * (box + 7) * 16
    batch = alignment_batch(n, box, opts.batch) * _prepared_bytes_per_image(box)
    side = box if opts.insertion == "trilinear" else npad_box
    # per image of the call: float32 read, float64 temporaries (two, slice_transforms), the plane's transform
    insertion = min(n, insert_chunk(box, opts.npad, opts.insertion)) * (20 * box * box + 12 * side * (side // 2 + 1))
    prepared = 0 if streamed else full_band_bytes(n, box)
    return images + accumulators + reference + batch + insertion + prepared


# ---------------------------------------------------------------------------------------------- small pieces
def _mask(maskfile, box: int, ou: int) -> np.ndarray:
    from .resolution import sphere_mask

    if maskfile is None:
        return sphere_mask(box, ou)
    mask, _ = read_volume(maskfile)
    if mask.shape != (box,) * 3:
        raise ValueError(f"{maskfile}: mask of shape {mask.shape} does not fit the {box}-pixel box")
    mask = mask.astype(np.float64)
    if not np.isfinite(mask).all():
        raise ValueError(f"{maskfile}: the mask has NaN or infinite voxels")
    inside = mask > 0.5
    if inside.all() or not inside.any():
        raise ValueError(f"{maskfile}: the mask is {'empty' if not inside.any() else 'full'} (every voxel "
                         f"{'<=' if not inside.any() else '>'} 0.5); the FSC and the reference need a mask with an "
                         "inside and an outside")
    return mask


def _half_sets(stack: ParticleStack, seed: int = 0) -> np.ndarray:
    """0/1 per particle: rlnRandomSubset - 1 when the input has a valid one; else a random split into halves of
    n // 2 and n - n // 2 particles drawn with ``seed`` (--seed; as RELION assigns random subsets; SPARX splits by
    index parity, which puts neighbouring particles, often from one micrograph, in different halves). The same on
    every MPI rank; written to particles.star as rlnRandomSubset."""
    subset = stack.meta.get("rlnRandomSubset")
    if subset is not None:
        s = np.asarray(subset).astype(np.int64) - 1
        if np.isin(s, (0, 1)).all() and 0 < s.sum() < len(s):
            return s
    n = len(stack)
    half = np.zeros(n, np.int64)
    half[np.random.default_rng(seed).permutation(n)[n // 2:]] = 1
    return half


def _chunks(n: int, chunk: float) -> list[np.ndarray]:
    """Contiguous blocks of particles, each about chunk * n of them (SPARX rebuilds the map after each)."""
    n_chunks = max(1, int(round(1.0 / chunk)))
    return [b for b in np.array_split(np.arange(n), n_chunks) if len(b)]


def _resolutions(curve, apix: float) -> tuple[float, float]:
    from .resolution import fsc_resolution

    return (fsc_resolution(curve.freq, curve.fsc, 0.5, apix_A=apix).resolution_A,
            fsc_resolution(curve.freq, curve.fsc, 0.143, apix_A=apix).resolution_A)


def _summary_line(rec: IterationRecord, maxit: int) -> str:
    head = f"iteration {rec.iteration + 1}/{maxit + 1} chunk {rec.chunk + 1}: FSC 0.5 {rec.fsc05_A:.2f} A, " \
           f"0.143 {rec.fsc0143_A:.2f} A" + ("" if rec.snr is None else f" (snr {rec.snr:.3g})")
    if rec.criterion_after is None:
        return head + f" (final reconstruction), {rec.wall_s:.1f} s"
    return (head + f", criterion {rec.criterion_before:.4f} -> {rec.criterion_after:.4f}, mean change "
            f"{rec.mean_angle_change_deg:.3f} deg / {rec.mean_shift_change_px:.3f} px, {rec.wall_s:.1f} s "
            f"(reconstruction {rec.reconstruct_s:.1f} s, alignment {rec.align_s:.1f} s, "
            f"{rec.evaluations / max(rec.align_s, 1e-9):.0f} evaluations/s)")


def _say(text: str) -> None:
    print(text, flush=True)
    log.info(text)


def _write_params(path: Path, poses: np.ndarray, *, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        np.savetxt(tmp, poses, fmt="%12.6f", header=" ".join(POSE_COLUMNS) + " (degrees; pixels, SPARX sign)")


def _write_json(path: Path, obj) -> None:
    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x
    text = json.dumps([{k: clean(v) for k, v in r.items()} for r in obj], indent=1)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


def _write_debug(outdir, iteration, ic, members, old, new, before, after) -> None:
    """--debug: per-image old and new parameters and criterion, appended to progress.txt."""
    with open(outdir / "progress.txt", "a") as f:  # a resumed run appends after the last complete chunk
        for i, o, p, b, a in zip(members, old, new, before, after):
            f.write(f"{iteration:3d} {ic:3d} {i:7d}  old " + " ".join(f"{v:10.4f}" for v in o) + f"  {b:.6f}"
                    "  new " + " ".join(f"{v:10.4f}" for v in p) + f"  {a:.6f}\n")


def _plot_fsc(path: Path, curves, apix: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for iteration, ic, curve in curves:
        label = f"iteration {iteration + 1}" + (f" chunk {ic + 1}" if ic else "")
        ax.plot(np.asarray(curve.freq) / apix, curve.fsc, label=label)
    ax.axhline(0.143, color="grey", lw=0.5)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC (half maps, masked)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
