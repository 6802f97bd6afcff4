"""Faults (issue 13): a run SIGKILLed just before or just after each atomic rename it makes, or in the middle of an
alignment or a reconstruction, then resumed (``--continue``; or run again where the kill came before the output
folder existed), ends with outputs identical in content to an uninterrupted run's, and ``--write-headers`` never
loses the input's original poses; the OS's refusals (a full disk, a read-only folder, an output under a file, too
little memory) end in one line naming the file and exit status 2."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_ali3d.cli import main
from gpu_ali3d.io.formats import read_stack, read_volume, write_stack
from gpu_ali3d.simulate import phantom, simulate

#: The faulted run: 12 particles of 16 pixels, 2 refinement iterations and the final reconstruction, two chunks per
#: iteration (a checkpoint mid-iteration), 3 alignment batches per chunk, --write-headers (the input replaced).
ARGS = ["--maxit", "2", "--chunk", "0.5", "--CTF", "--seed", "3", "--batch", "2", "--write-headers"]

#: Every rename the run makes, in order (outputs, the input, and the output folder itself; names with the
#: iteration and chunk numbers as '#'). test_the_run_makes_exactly_these_renames keeps this list true.
_CHUNK = ["out/resolution#_#", "out/vol#_#.hdf", "out/volf#_#.hdf"]
_CHECKPOINT = ["out/checkpoint.npz", "out/summary.json"]
RENAMES = (
    [".out.new-*/previous_poses.txt", ".out.new-*/job.json", "out"]                      # the folder, made whole
    + 2 * [*_CHUNK, *_CHECKPOINT, *_CHUNK, "out/params_#.txt", *_CHECKPOINT]             # iterations 1, 2
    + [*_CHUNK, *_CHECKPOINT, *_CHUNK, "out/map.mrc", "out/map_filtered.mrc", "out/mask.mrc",          # final maps
       *_CHECKPOINT]
    + ["out/fsc.png", "out/particles.star", "input.star", "out/checkpoint.npz"])        # the end; --write-headers


KILL_POINTS = ([("rename", n, when) for n in range(1, len(RENAMES) + 1) for when in ("before", "after")]
               + [("align", 5, "before"),      # iteration 1, chunk 2: after the first of its 3 alignment batches
                  ("insert", 8, "before")])     # iteration 2, chunk 2: one half set inserted, not the other
#: The default run's kill points, one of each state a kill can leave (the rest, marked slow, repeat one of these:
#: e.g. a kill around any of a chunk's map writes leaves the same state): the output folder half made (1, 2),
#: made whole (3), a chunk half written (5), around a mid-iteration checkpoint (7), after an iteration's params
#: (12), the final maps written (36), between the last chunk's checkpoint and summary.json (38), after
#: particles.star (40), around the input's replacement (41), after the very last write (42); and mid-alignment,
#: mid-insertion.
DEFAULT_POINTS = {("rename", 1, "after"), ("rename", 2, "after"), ("rename", 3, "before"), ("rename", 3, "after"),
                  ("rename", 5, "after"), ("rename", 7, "before"), ("rename", 7, "after"), ("rename", 12, "after"),
                  ("rename", 36, "after"), ("rename", 38, "before"), ("rename", 40, "after"),
                  ("rename", 41, "before"), ("rename", 41, "after"), ("rename", 42, "after"),
                  ("align", 5, "before"), ("insert", 8, "before")}


def _marks(point):
    return () if point in DEFAULT_POINTS else (pytest.mark.slow,)


def _point_id(point):
    kind, n, when = point
    return f"{when}-{kind}{n}-{RENAMES[n - 1]}" if kind == "rename" else f"{kind}-call{n}"


# A warm Python that forks one child per run: each killed run starts in milliseconds instead of paying ~3 s of
# imports. It imports modules only (no kernel is loaded, no OpenMP thread started, no CUDA context made before a
# fork). A child installs its kill point, runs gpu_ali3d.cli.main, and exits with its status (or is SIGKILLed).
_SERVER = r'''
import json, os, signal, sys, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, h5py, mrcfile, starfile, scipy.fft, scipy.ndimage
import gpu_ali3d.alignment, gpu_ali3d.cli, gpu_ali3d.io.formats, gpu_ali3d.reconstruct, gpu_ali3d.refine

def arm(job):
    """Count renames into job["within"] (recording them) and the calls of the alignment's batches ('align') and
    the half-set insertions ('insert'); SIGKILL this process at job["kill"] = [kind, n, "before" | "after"]."""
    kind, n, when = job["kill"] or (None, 0, None)
    within = os.path.realpath(job["within"]) + os.sep
    counts = {"rename": 0, "align": 0, "insert": 0}

    def tick(what, moment):
        if what == kind and counts[what] == n and moment == when:
            os.kill(os.getpid(), signal.SIGKILL)

    def renaming(real):
        def rename(src, dst, *args, **kw):
            path = os.path.realpath(dst)
            if not path.startswith(within):
                return real(src, dst, *args, **kw)
            counts["rename"] += 1
            if job.get("record"):
                with open(job["record"], "a") as f:
                    f.write(path[len(within):] + "\n")
            tick("rename", "before")
            out = real(src, dst, *args, **kw)
            tick("rename", "after")
            return out
        return rename

    def calling(module, name, what):
        real = getattr(module, name)        # AttributeError here: the test's hook point was renamed
        def call(*args, **kw):
            counts[what] += 1
            tick(what, "before")
            return real(*args, **kw)
        setattr(module, name, call)

    os.replace, os.rename = renaming(os.replace), renaming(os.rename)
    calling(gpu_ali3d.alignment, "_align_fused", "align")
    calling(gpu_ali3d.alignment, "_align_reference", "align")
    calling(gpu_ali3d.reconstruct, "_accumulate", "insert")

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.chdir(job["cwd"])
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(log, 1)
            os.dup2(log, 2)
            arm(job)
            code = gpu_ali3d.cli.main(job["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                      "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)
'''


class _Runner:
    """Runs ``gpu-ali3d ARGV`` in a forked child of the warm server; returns (exit code or None, signal or None)."""

    def __init__(self, env):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def __call__(self, argv, cwd: Path, *, kill=None, record: Path | None = None, within: Path | None = None):
        job = {"argv": argv, "cwd": str(cwd), "kill": kill, "within": str(within or cwd), "log": str(cwd / "run.log"),
               "record": None if record is None else str(record)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        reply = json.loads(line)
        return reply["code"], reply["signal"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    env = {**os.environ, "GPU_ALI3D_CACHE": str(tmp_path_factory.getbasetemp() / "kernel-cache")}
    r = _Runner(env)
    yield r
    r.close()


@pytest.fixture(scope="module")
def stack():
    s, _ = simulate(phantom(16), 12, apix_A=4.0, snr=10.0, angle_error_deg=4.0, shift_error_px=1.0, ctf=True,
                    rng=np.random.default_rng(5))
    return s


def _case(folder: Path, stack) -> Path:
    """A folder with the input (input.star beside its input.mrcs) the run reads and --write-headers replaces."""
    folder.mkdir()
    cwd = os.getcwd()
    os.chdir(folder)                         # image paths as the run sees them (from its folder)
    try:
        write_stack(stack, "input.star")
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture(scope="module")
def whole(runner, stack, tmp_path_factory):
    """The uninterrupted run, with the renames it made recorded (names relative to its folder)."""
    case = _case(tmp_path_factory.mktemp("faults") / "whole", stack)
    record = case.parent / "renames.txt"
    code, sig = runner(["refine", "input.star", "out", *ARGS], case, record=record)
    assert (code, sig) == (0, None), (case / "run.log").read_text()
    return case, record.read_text().splitlines()


def _kind(name: str) -> str:
    return re.sub(r"\d{3}", "#", re.sub(r"^\.out\.new-[0-9a-f]+", ".out.new-*", name))


def test_the_run_makes_exactly_these_renames(whole):
    _, renames = whole
    assert [_kind(n) for n in renames] == RENAMES
    assert len(RENAMES) == 42 and DEFAULT_POINTS <= set(KILL_POINTS)


def _content(case: Path) -> dict:
    """What must match an uninterrupted run: every output's bytes (particles.star, FSC curves, params,
    previous_poses.txt, fsc.png; a STAR file's time-stamp line aside), the maps' voxels and pixel size (their
    headers hold the time), the --write-headers input's bytes, summary.json and the checkpoint without their wall
    times, job.json without its absolute paths. log.txt (times, and a resumed run's second part) is left out.
    Hidden files other than the lock would be a temporary left behind, and so are stray folders beside out."""
    out = case / "out"
    content = {}
    for p in sorted(out.iterdir()):
        if p.name in ("log.txt", "summary.json", "checkpoint.npz", "job.json", ".gpu-ali3d.lock"):
            continue
        if p.suffix in (".hdf", ".mrc"):             # their headers hold the time they were written: the voxels
            vol, apix = read_volume(p)
            content[p.name] = (hashlib.sha256(vol.tobytes()).hexdigest(), vol.shape, apix)
        else:
            content[p.name] = hashlib.sha256(_untimed(p.read_bytes(), case)).hexdigest()
    untimed = lambda records: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]  # noqa: E731
    content["summary.json"] = untimed(json.loads((out / "summary.json").read_text()))
    with np.load(out / "checkpoint.npz") as z:
        meta = json.loads(str(z["meta"]))
        content["checkpoint.npz"] = ({k: z[k].tobytes() for k in sorted(z.files) if k != "meta"},
                                     {**meta, "records": untimed(meta["records"])})
    job = json.loads((out / "job.json").read_text())
    content["job.json"] = {k: v for k, v in job.items() if k not in ("stack",)}
    content["input.star"] = _untimed((case / "input.star").read_bytes(), case)
    content["beside out"] = sorted(p.name for p in case.iterdir() if p.name != "run.log")
    return content


def _untimed(text: bytes, case: Path) -> bytes:
    """A STAR file without the line where starfile says when it wrote it, and with the run's folder as 'CASE' in
    any absolute path (STAR files name images outside the current folder by absolute paths)."""
    text = text.replace(os.fsencode(case.resolve()), b"CASE").replace(os.fsencode(case), b"CASE")
    return re.sub(rb"^# Created by the starfile .* at [0-9:]+ on [0-9/]+\n", b"", text, flags=re.M)


@pytest.mark.parametrize("point", [pytest.param(p, marks=_marks(p), id=_point_id(p)) for p in KILL_POINTS])
def test_killed_at_any_write_then_resumed_gives_the_uninterrupted_result(runner, stack, whole, tmp_path, point):
    whole_case, _ = whole
    case = _case(tmp_path / "case", stack)
    original = (case / "input.star").read_bytes()
    original_poses = read_stack(case / "input.star").poses
    code, sig = runner(["refine", "input.star", "out", *ARGS], case, kill=list(point))
    assert (code, sig) == (None, signal.SIGKILL), "ended before the kill point: " + (case / "run.log").read_text()

    # --write-headers never loses the original poses: the input is untouched, or previous_poses.txt holds them
    previous = case / "out" / "previous_poses.txt"
    if (case / "input.star").read_bytes() != original:
        np.testing.assert_allclose(np.loadtxt(previous), original_poses, atol=1e-5)

    if not (case / "out").exists():             # killed before the folder was made: the same command again
        code, sig = runner(["refine", "input.star", "out", *ARGS], case)
    else:
        code, sig = runner(["refine", "--continue", "out"], case)
        if (code, point) == (2, ("rename", len(RENAMES), "after")):       # killed after its very last write
            assert "finished already" in (case / "run.log").read_text()
            code = 0
    assert (code, sig) == (0, None), (case / "run.log").read_text()
    np.testing.assert_allclose(np.loadtxt(previous), original_poses, atol=1e-5)
    assert _content(case) == _content(whole_case)
    hidden = sorted(p.name for p in (case / "out").iterdir() if p.name.startswith("."))
    assert hidden == [".gpu-ali3d.lock"], hidden


# ------------------------------------------------------------------------------------ the OS's refusals, one line
@pytest.fixture(scope="module")
def small_input(stack, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("os")
    write_stack(stack, folder / "input.star")
    return folder / "input.star"


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _full_disk_at(monkeypatch, folder: Path, name: str):
    """Make the atomic write of ``folder/name`` fail as a full disk does (write() raises ENOSPC, naming no file)."""
    import gpu_ali3d.io.atomic as atomic

    real = os.replace

    def replace(src, dst, *args, **kw):
        if Path(dst) == folder / name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(atomic.os, "replace", replace)


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(small_input, tmp_path, capsys, monkeypatch):
    before = _digest(small_input.parent)
    _full_disk_at(monkeypatch, tmp_path / "out", "vol000_000.hdf")
    assert main(["refine", str(small_input), str(tmp_path / "out"), "--maxit", "1", "--CTF"]) == 2
    err = _one_line(capsys)
    assert f"{tmp_path / 'out' / 'vol000_000.hdf'}: No space left on device" in err and "run the command again" in err
    assert sorted(tmp_path.iterdir()) == []                     # no out, no hidden folder beside it
    assert _digest(small_input.parent) == before


def test_a_full_disk_later_keeps_the_checkpoint_and_resumes_to_the_same_result(small_input, tmp_path, capsys,
                                                                              monkeypatch):
    args = ["--maxit", "1", "--CTF", "--chunk", "0.5"]
    assert main(["refine", str(small_input), str(tmp_path / "whole"), *args]) == 0
    with monkeypatch.context() as m:
        _full_disk_at(m, tmp_path / "out", "volf001_000.hdf")
        assert main(["refine", str(small_input), str(tmp_path / "out"), *args]) == 2
    err = _one_line(capsys)
    assert f"{tmp_path / 'out' / 'volf001_000.hdf'}: No space left on device" in err, err
    assert f"--continue {tmp_path / 'out'}" in err, err
    hidden = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
    assert hidden == [".gpu-ali3d.lock"] and not (tmp_path / "out" / "volf001_000.hdf").exists()
    assert main(["refine", "--continue", str(tmp_path / "out")]) == 0           # space freed
    for name in ("particles.star", "resolution001_001", "params_000.txt"):
        assert _untimed((tmp_path / "out" / name).read_bytes(), tmp_path) == \
            _untimed((tmp_path / "whole" / name).read_bytes(), tmp_path), name


def test_a_full_disk_while_making_the_output_folder_names_its_job_file(small_input, tmp_path, capsys, monkeypatch):
    import gpu_ali3d.io.atomic as atomic

    real = os.replace

    def replace(src, dst, *args, **kw):
        if Path(dst).name == "job.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(atomic.os, "replace", replace)
    assert main(["refine", str(small_input), str(tmp_path / "out"), "--maxit", "1"]) == 2
    err = _one_line(capsys)
    assert f"{tmp_path / 'out' / 'job.json'}: No space left on device" in err, err
    assert sorted(tmp_path.iterdir()) == []


def test_a_read_only_parent_is_refused_before_any_work(small_input, tmp_path, capsys, monkeypatch):
    real = os.mkdir

    def mkdir(path, *args, **kw):                 # what a read-only file system answers (also to root)
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert main(["refine", str(small_input), str(tmp_path / "out"), "--maxit", "1"]) == 2
    err = _one_line(capsys)
    assert str(tmp_path / "out") in err and "Read-only file system" in err, err
    assert sorted(tmp_path.iterdir()) == []


def test_an_output_under_a_file_is_refused_before_any_work(small_input, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert main(["refine", str(small_input), str(tmp_path / "afile" / "sub" / "out"), "--maxit", "1"]) == 2
    err = _one_line(capsys)
    assert f"{tmp_path / 'afile'} is a file" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_out_of_memory_says_how_much_and_what_to_change(small_input, tmp_path, capsys, monkeypatch):
    import gpu_ali3d.refine as refine

    def align_poses(*args, **kw):
        return np.empty((2**31, 2**28))            # 4 EiB: numpy raises MemoryError saying so

    monkeypatch.setattr(refine, "align_poses", align_poses)
    assert main(["refine", str(small_input), str(tmp_path / "out"), "--maxit", "1"]) == 2
    err = _one_line(capsys)
    assert "out of memory" in err and "EiB" in err and "--batch" in err, err
    assert sorted(tmp_path.iterdir()) == []


def test_continue_into_a_read_only_folder_fails_before_any_work(small_input, tmp_path, capsys, monkeypatch):
    import tempfile

    run = tmp_path / "run"
    assert main(["refine", str(small_input), str(run), "--maxit", "0"]) == 0
    (run / "checkpoint.npz").unlink()               # as if killed before its first checkpoint: all work to do
    before = _digest(run)
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if Path(dir) == run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("gpu_ali3d.refine.read_stack", lambda *a, **k: pytest.fail("read the input before refusing"))
    capsys.readouterr()
    assert main(["refine", "--continue", str(run)]) == 2
    err = _one_line(capsys)
    assert str(run) in err and "--continue" in err and "Read-only file system" in err, err
    assert _digest(run) == before


@pytest.mark.parametrize("fault", ["read-only file", "full disk"])
def test_write_headers_onto_a_read_only_or_full_input_fails_before_any_work_also_on_continue(
        stack, tmp_path, capsys, monkeypatch, fault):
    src = tmp_path / "in" / "input.star"
    src.parent.mkdir()
    write_stack(stack, src)
    run = tmp_path / "run"
    assert main(["refine", str(src), str(run), "--maxit", "0", "--write-headers"]) == 0
    (run / "checkpoint.npz").unlink()               # a run to resume from the start
    inputs, outputs = _digest(src.parent), _digest(run)
    if fault == "read-only file":
        src.chmod(0o444)
        expected = "read-only"
    else:
        real = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000)
                            if Path(p) == src.parent else real(p))
        expected = "MiB free"
    import gpu_ali3d.refine as refine
    monkeypatch.setattr(refine, "_setup", lambda *a, **k: pytest.fail("went on to the work before refusing"))
    try:
        capsys.readouterr()
        assert main(["refine", str(src), str(tmp_path / "new"), "--maxit", "0", "--write-headers"]) == 2
        err = _one_line(capsys)
        assert str(src) in err and "--write-headers" in err and expected in err, err
        assert not (tmp_path / "new").exists()
        assert main(["refine", "--continue", str(run)]) == 2
        err = _one_line(capsys)
        assert str(src) in err and "--write-headers" in err and expected in err, err
    finally:
        src.chmod(0o644)
    assert _digest(src.parent) == inputs and _digest(run) == outputs


# A real full disk and a real read-only file system: a tmpfs of 160 KiB in a private mount namespace (unshare -rm:
# the mount lives as long as the shell and is nobody else's), where this is allowed; the checks above inject the
# same errors everywhere. Each step is its own gpu-ali3d process, as a user would run it.
_ON_TMPFS = r"""
set -u
run() { name=$1; shift; "$PY" -m gpu_ali3d refine "$@" 2>"$T/$name.err"; echo "$name $?" >>"$T/codes"; }
mount -t tmpfs -o size=160k tmpfs "$DISK"
run full "$SRC" "$DISK/out" $ARGS
ls -a "$DISK/out" >"$T/left" 2>/dev/null
mount -o remount,size=4m "$DISK"
run continued --continue "$DISK/out"
cp "$DISK/out/particles.star" "$T/particles.star"
mount -o remount,ro "$DISK"
run read-only "$SRC" "$DISK/other" $ARGS
run read-only-continue --continue "$DISK/out"
"""


def test_a_real_full_disk_and_a_real_read_only_file_system(small_input, tmp_path):
    unshare = shutil.which("unshare")
    probe = unshare and subprocess.run([unshare, "-rm", "mount", "-t", "tmpfs", "tmpfs", str(tmp_path)],
                                       capture_output=True)
    if not probe or probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm); the injected faults above cover the same paths")
    disk, t = tmp_path / "disk", tmp_path / "t"
    disk.mkdir()
    t.mkdir()
    args = "--maxit 3 --chunk 0.5 --CTF"
    env = {**os.environ, "PY": sys.executable, "T": str(t), "DISK": str(disk), "SRC": str(small_input), "ARGS": args}
    proc = subprocess.run([unshare, "-rm", "sh", "-c", _ON_TMPFS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    codes = dict(line.split() for line in (t / "codes").read_text().splitlines())
    assert codes == {"full": "2", "continued": "0", "read-only": "2", "read-only-continue": "2"}, codes
    err = {name: (t / f"{name}.err").read_text().strip() for name in codes}
    for name in ("full", "read-only", "read-only-continue"):
        assert len(err[name].splitlines()) == 1 and err[name].startswith("gpu-ali3d: error: "), err[name]
    assert f"{disk / 'out'}/" in err["full"] and "No space left on device" in err["full"], err["full"]
    assert f"--continue {disk / 'out'}" in err["full"], err["full"]
    assert str(disk / "other") in err["read-only"] and "Read-only file system" in err["read-only"]
    assert str(disk / "out") in err["read-only-continue"] and "Read-only file system" in err["read-only-continue"]
    # the disk filled after the first checkpoint: the folder was kept, whole, and resumed to the uninterrupted result
    left = (t / "left").read_text().split()
    assert "checkpoint.npz" in left and [n for n in left if n.startswith(".") and n not in (".", "..")] == \
        [".gpu-ali3d.lock"], left
    whole = tmp_path / "w" / "out"               # as deep as disk/out: particles.star names the same ../ paths
    assert main(["refine", str(small_input), str(whole), *args.split()]) == 0
    assert _untimed((t / "particles.star").read_bytes(), tmp_path) == \
        _untimed((whole / "particles.star").read_bytes(), tmp_path)
    assert sorted(p.name for p in disk.iterdir()) == []          # the tmpfs went with the namespace
