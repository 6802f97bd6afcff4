"""Checkpoints and --continue: a run killed mid-iteration and resumed ends exactly where an uninterrupted run
does; --write-headers replaces the input only after success, keeping the previous poses."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpu_ali3d import local_ali3d
from gpu_ali3d.cli import main
from gpu_ali3d.io.formats import read_stack, write_stack
from gpu_ali3d.simulate import phantom, simulate

ARGS = ["--maxit", "2", "--chunk", "0.5", "--CTF", "--interpolation", "trilinear", "--seed", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    stack, _ = simulate(phantom(24), 30, apix_A=4.0, snr=10.0, angle_error_deg=4.0, shift_error_px=1.5, ctf=True,
                        rng=np.random.default_rng(8))
    write_stack(stack, tmp / "sim.star")
    return tmp / "sim.star"


def _checkpoint_position(outdir: Path):
    try:
        with np.load(outdir / "checkpoint.npz") as z:
            meta = json.loads(str(z["meta"]))
        return meta["next_iteration"], meta["next_chunk"]
    except (OSError, ValueError, KeyError):
        return None


def _refine_killed_after(dataset: Path, outdir: Path, args, position) -> None:
    """Run refine in a child process and SIGKILL it (no clean-up) once its checkpoint is at or past position
    (next iteration, next chunk); fails if the run ends first."""
    exe = Path(sys.executable).with_name("gpu-ali3d")
    proc = subprocess.Popen([str(exe), "refine", str(dataset), str(outdir), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        pos = _checkpoint_position(outdir)
        if pos is not None and pos >= position:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"


def test_killed_run_resumes_to_the_same_result(dataset, tmp_path, capsys):
    # the uninterrupted run
    assert main(["refine", str(dataset), str(tmp_path / "whole"), *ARGS]) == 0
    whole = read_stack(tmp_path / "whole" / "particles.star").poses

    # the same run, killed (SIGKILL: no clean-up) once it has checkpointed a chunk of the second iteration
    _refine_killed_after(dataset, tmp_path / "cut", ARGS, (1, 1))
    assert not (tmp_path / "cut" / "particles.star").exists()
    capsys.readouterr()
    assert main(["refine", "--continue", str(tmp_path / "cut")]) == 0
    out = capsys.readouterr().out
    assert "resuming at iteration 2" in out
    resumed = read_stack(tmp_path / "cut" / "particles.star").poses
    np.testing.assert_array_equal(resumed, whole)        # same inputs, same arithmetic: bitwise the same
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert [(r["iteration"], r["chunk"]) for r in summary] == [(i, c) for i in range(3) for c in range(2)]


def test_continue_refuses_a_finished_run_and_a_foreign_directory(dataset, tmp_path, capsys):
    local_ali3d(str(dataset), tmp_path / "done", maxit=0, progress=False)
    assert main(["refine", "--continue", str(tmp_path / "done")]) == 2
    assert "finished already" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["refine", "--continue", str(tmp_path / "empty")]) == 2
    assert "job.json" in capsys.readouterr().err


def test_write_headers_replaces_the_input_after_success(dataset, tmp_path):
    src = tmp_path / "input.star"
    original = read_stack(dataset)
    # a copy of the input STAR (its rlnImageName points at the dataset's sim.mrcs by a relative path)
    write_stack(original, src)
    before = read_stack(src).poses
    result = local_ali3d(str(src), tmp_path / "out", maxit=1, CTF=True, interpolation="trilinear",
                         write_headers=True, progress=False)
    after = read_stack(src)
    np.testing.assert_allclose(after.poses, result.poses, atol=1e-6)
    assert not np.allclose(after.poses, before)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "out" / "previous_poses.txt"), before, atol=1e-5)
    np.testing.assert_array_equal(after.read_images([0, 5]), original.read_images([0, 5]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["input.star"]   # no temporary left


def test_failed_run_leaves_the_input_untouched(dataset, tmp_path):
    src = tmp_path / "input.star"
    write_stack(read_stack(dataset), src)
    text = src.read_text()
    with pytest.raises(ValueError):
        local_ali3d(str(src), tmp_path / "out", maxit=1, write_headers=True, function="no_such_module:f",
                    progress=False)
    assert src.read_text() == text


def test_poses_do_not_depend_on_the_alignment_batch(dataset, tmp_path):
    # each image's simplex and score are independent of the others in its batch: any batch size, same bits
    common = dict(maxit=1, CTF=True, interpolation="trilinear", progress=False)
    whole = local_ali3d(str(dataset), tmp_path / "auto", **common).poses
    small = local_ali3d(str(dataset), tmp_path / "by7", batch=7, **common).poses
    np.testing.assert_array_equal(small, whole)


# A refine run in a child process whose write_stack kills the process (SIGKILL: no clean-up, no finally) or raises
# KeyboardInterrupt (Ctrl-C) just before or just after it replaces the input: the exact points where
# --write-headers could lose the input's poses.
_KILLING_RUN = """
import os, signal, sys
from pathlib import Path
import gpu_ali3d.refine as refine
from gpu_ali3d.cli import main

source, when, how = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
def stop():
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise KeyboardInterrupt

def stopping(real):  # the writers refine uses (write_poses for --write-headers), stopped around the input's
    def write(stack, path, **kw):
        is_input = Path(path).resolve() == source
        if is_input and when == "before":
            stop()
        real(stack, path, **kw)
        if is_input and when == "after":
            stop()
    return write

refine.write_stack, refine.write_poses = stopping(refine.write_stack), stopping(refine.write_poses)
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("when, how", [("before", "kill"), ("after", "kill"), ("after", "interrupt")])
def test_write_headers_interrupted_never_loses_the_original_poses(dataset, tmp_path, when, how, capsys):
    src = tmp_path / "input.star"
    write_stack(read_stack(dataset), src)
    original = read_stack(src).poses
    out = tmp_path / "out"
    args = ["refine", str(src), str(out), "--maxit", "1", "--CTF", "--interpolation", "trilinear",
            "--write-headers"]
    proc = subprocess.run([sys.executable, "-c", _KILLING_RUN, str(src), when, how, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL
    replaced = not np.allclose(read_stack(src).poses, original, atol=1e-5)
    assert replaced == (when == "after")
    np.testing.assert_allclose(np.loadtxt(out / "previous_poses.txt"), original, atol=1e-5)

    capsys.readouterr()
    assert main(["refine", "--continue", str(out)]) == 0          # finishes the job: the input is replaced once
    refined = read_stack(out / "particles.star").poses
    np.testing.assert_allclose(read_stack(src).poses, refined, atol=1e-5)
    np.testing.assert_allclose(np.loadtxt(out / "previous_poses.txt"), original, atol=1e-5)
    # and the result is the uninterrupted run's
    whole = local_ali3d(str(dataset), tmp_path / "whole", maxit=1, CTF=True, interpolation="trilinear",
                        progress=False).poses
    np.testing.assert_allclose(refined, whole, atol=1e-5)


def test_write_headers_refuses_an_input_in_a_read_only_folder_before_any_work(dataset, tmp_path, capsys,
                                                                            monkeypatch):
    src = tmp_path / "input.star"
    write_stack(read_stack(dataset), src)
    text = src.read_text()
    import tempfile

    def read_only(*args, dir=None, **kw):         # what a read-only file system answers (also to root)
        if Path(dir) == tmp_path:
            raise OSError(30, "Read-only file system")
        return real(*args, dir=dir, **kw)

    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["refine", str(src), str(tmp_path / "out"), "--maxit", "1", "--write-headers"]) == 2
    err = capsys.readouterr().err
    assert "--write-headers" in err and str(tmp_path) in err and "Read-only" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and src.read_text() == text


def test_killed_debug_run_resumes_with_each_chunk_logged_once_and_no_temporaries(dataset, tmp_path, capsys):
    args = [*ARGS, "--debug"]
    assert main(["refine", str(dataset), str(tmp_path / "whole"), *args]) == 0
    _refine_killed_after(dataset, tmp_path / "cut", args, (0, 1))
    (tmp_path / "cut" / ".summary.json.abc.json").write_text("{")       # a temporary a kill could leave
    with open(tmp_path / "cut" / "progress.txt", "a") as f:             # and lines of a chunk it did not finish
        f.write("  1   1       0  old partial line\n")
    capsys.readouterr()
    assert main(["refine", "--continue", str(tmp_path / "cut")]) == 0
    cut = (tmp_path / "cut" / "progress.txt").read_text()
    assert cut == (tmp_path / "whole" / "progress.txt").read_text()
    left = sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith("."))
    assert left == [".gpu-ali3d.lock"], left


def test_a_second_run_on_a_busy_outdir_is_refused(dataset, tmp_path, capsys):
    from gpu_ali3d.refine import _outdir_lock

    local_ali3d(str(dataset), tmp_path / "run", maxit=0, progress=False)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    capsys.readouterr()
    with _outdir_lock(tmp_path / "run"):                      # as a running refine holds it
        assert main(["refine", "--continue", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "another gpu-ali3d run" in err and str(tmp_path / "run") in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
