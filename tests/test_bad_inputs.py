"""Bad inputs, tried as an adversary would (issue 13): each gets exit status 2, one line on stderr that names the
option or file at fault, nothing left behind in the output folder, and the inputs unchanged."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from gpu_ali3d.cli import main
from gpu_ali3d.io.formats import write_stack
from gpu_ali3d.simulate import phantom, simulate


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    stack, _ = simulate(phantom(24), 20, apix_A=4.0, snr=10.0, angle_error_deg=3.0, shift_error_px=1.0, ctf=True,
                        rng=np.random.default_rng(2))
    write_stack(stack, tmp / "sim.star")
    write_stack(stack, tmp / "nan.star")              # its own stack nan.mrcs, then one pixel made NaN
    with mrcfile.open(tmp / "nan.mrcs", mode="r+") as m:
        m.data[3, 5, 7] = np.nan
    for name, value in (("zeros", 0.0), ("ones", 1.0)):
        with mrcfile.new(tmp / f"mask_{name}.mrc") as m:
            m.set_data(np.full((24, 24, 24), value, np.float32))
    with mrcfile.new(tmp / "mask_small.mrc") as m:
        m.set_data(np.ones((16, 16, 16), np.float32))
    functions = {
        "raises": "def f(ref_data):\n    return 1 / 0\n",
        "none": "def f(ref_data):\n    return None\n",
        "single": "def f(ref_data):\n    return ref_data[2]\n",
        "shape": "import numpy as np\ndef f(ref_data):\n    return np.zeros((8, 8, 8)), 0\n",
        "nan": "import numpy as np\ndef f(ref_data):\n    return np.full(ref_data[2].shape, np.nan), 0\n",
        "exit": "import sys\ndef f(ref_data):\n    sys.exit(0)\n",
        "notarray": "def f(ref_data):\n    return 'map', 0\n",
        "importerror": "import no_such_package_here\ndef f(ref_data):\n    return ref_data[2], 0\n",
    }
    for name, code in functions.items():
        (tmp / f"uf_{name}.py").write_text(code)
    (tmp / "empty.star").write_text("")
    plain, _ = simulate(phantom(24), 6, apix_A=4.0, snr=10.0, angle_error_deg=3.0, shift_error_px=1.0, ctf=False,
                        rng=np.random.default_rng(3))
    write_stack(plain, tmp / "noctf.star")                                      # no defocus: --CTF cannot apply
    text = (tmp / "sim.star").read_text()
    (tmp / "dupcol.star").write_text(re.sub(r"_rlnDefocusV #(\d+)", r"_rlnDefocusU #\1", text))   # a column twice
    (tmp / "text_defocus.star").write_text(re.sub(r"(@\S+(?:\s+\S+){5}\s+)\S+", r"\1abc", text, count=1))
    (tmp / "lost_mrcs.star").write_text(re.sub(r"@\S*sim\.mrcs", "@lost.mrcs", text))   # names a missing stack
    return tmp


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# (extra arguments, what the one-line message must contain); "{d}" is the inputs folder
OPTION_CASES = [
    (["--ts", "0"], "--ts"), (["--ts", "inf"], "--ts"), (["--ts", "-1"], "--ts"), (["--ts", "nan"], "--ts"),
    (["--delta", "0"], "--delta"), (["--delta", "nan"], "--delta"), (["--delta", "inf"], "--delta"),
    (["--delta", "120"], "--delta"), (["--delta", "-2"], "--delta"),
    (["--sym", "c100000"], "--sym"), (["--sym", "x3"], "sym"), (["--sym", "c0"], "sym"), (["--sym", "d0"], "sym"),
    (["--npad", "1000"], "--npad"), (["--npad", "0"], "--npad"), (["--npad", "-2"], "--npad"),
    (["--maxit", "-1"], "--maxit"), (["--chunk", "0"], "--chunk"), (["--chunk", "1.5"], "--chunk"),
    (["--chunk", "-0.5"], "--chunk"), (["--snr", "0"], "--snr"), (["--snr", "-1"], "--snr"),
    (["--snr", "nan"], "--snr"), (["--snr", "inf"], "--snr"), (["--ou", "1000"], "--ou"), (["--ou", "0"], "--ou"),
    (["--ou", "-5"], "--ou"), (["--batch", "-1"], "--batch"),
    (["--function", "no_such_module:f"], "--function"), (["--function", "not a name"], "--function"),
    (["--function", "{d}/missing.py:f"], "missing.py"), (["--function", "{d}/uf_none.py:g"], "--function"),
    (["--function", "{d}/uf_raises.py:f"], "ZeroDivisionError"), (["--function", "{d}/uf_none.py:f"], "--function"),
    (["--function", "{d}/uf_single.py:f"], "--function"), (["--function", "{d}/uf_shape.py:f"], "shape"),
    (["--function", "{d}/uf_nan.py:f"], "NaN"), (["--function", "{d}/uf_exit.py:f"], "sys.exit"),
    (["--function", "{d}/uf_notarray.py:f"], "--function"), (["--function", "unknown_builtin"], "--function"),
]


@pytest.mark.parametrize("extra, expected", OPTION_CASES, ids=[" ".join(c[0]).replace("{d}/", "") for c in OPTION_CASES])
def test_bad_option_is_refused_cleanly(inputs, tmp_path, capsys, extra, expected):
    before = _digest(inputs)
    out = tmp_path / "out"
    args = [a.replace("{d}", str(inputs)) for a in extra]
    code = main(["refine", str(inputs / "sim.star"), str(out), "--maxit", "1", "--CTF", "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected.replace("{d}/", "") in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert _digest(inputs) == before


FILE_CASES = [
    (["{d}/no_such.star"], "no_such.star"),
    (["{d}"], "{d}"),
    (["{d}/empty.star"], "empty.star"),
    (["{d}/nan.star"], "nan.star"),
    (["{d}/sim.star", "{out}", "{d}/mask_zeros.mrc"], "mask_zeros.mrc"),
    (["{d}/sim.star", "{out}", "{d}/mask_ones.mrc"], "mask_ones.mrc"),
    (["{d}/sim.star", "{out}", "{d}/mask_small.mrc"], "mask_small.mrc"),
    (["{d}/sim.star", "{out}", "{d}/no_mask.mrc"], "no_mask.mrc"),
    (["{d}/noctf.star"], "--CTF"),                       # README: --CTF given but the stack has no CTF parameters
    (["{d}/lost_mrcs.star"], "lost.mrcs"),               # README: rlnImageName points at a missing .mrcs
    (["{d}/dupcol.star"], "dupcol.star: data_particles has the column rlnDefocusU twice"),   # a duplicate column
    (["{d}/text_defocus.star"], "text_defocus.star: particle 1: "),    # a non-numeric defocus (column named next)
    (["{d}/sim.star", "{d}/sim.star/out"], "is a file"),  # an output directory under a regular file (ENOTDIR)
]


@pytest.mark.parametrize("paths, expected", FILE_CASES, ids=[str(i) for i in range(len(FILE_CASES))])
def test_bad_file_is_refused_cleanly(inputs, tmp_path, capsys, paths, expected):
    before = _digest(inputs)
    out = tmp_path / "out"
    args = [a.replace("{d}", str(inputs)).replace("{out}", str(out)) for a in paths]
    if len(args) == 1:
        args.append(str(out))
    code = main(["refine", *args, "--maxit", "1", "--CTF", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected.replace("{d}", str(inputs)) in err, err
    assert not out.exists()
    assert _digest(inputs) == before


def test_existing_outdir_is_refused_and_left_alone(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["refine", str(inputs / "sim.star"), str(out), "--maxit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --- --continue: the run's own options, input and user function -------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    """A small finished run whose job.json --continue reads (the checks come before 'finished already')."""
    tmp = tmp_path_factory.mktemp("cont")
    src = tmp / "input.star"
    from gpu_ali3d.io.formats import read_stack
    write_stack(read_stack(inputs / "sim.star"), src)
    (tmp / "uf.py").write_text("from gpu_ali3d.user_functions import ref_ali3d\n"
                               "def f(ref_data):\n    return ref_ali3d(ref_data)\n")
    import os
    cwd = os.getcwd()
    os.chdir(tmp)
    try:                                      # a relative --function path, from the run's folder
        assert main(["refine", "input.star", "run", "--maxit", "0", "--function", "uf.py:f"]) == 0
    finally:
        os.chdir(cwd)
    return tmp


def _continue(run: Path, capsys, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["refine", "--continue", str(run), *extra])
    return code, capsys.readouterr().err.strip()


def test_continue_refuses_options_it_would_ignore(finished_run, capsys):
    before = _digest(finished_run / "run")
    code, err = _continue(finished_run / "run", capsys, "--maxit", "6", "--sym", "c2", "--write-headers")
    assert code == 2 and len(err.splitlines()) == 1
    assert "--maxit 6" in err and "--sym c2" in err and "--write-headers" in err
    assert _digest(finished_run / "run") == before


def test_continue_records_the_function_file_by_absolute_path(finished_run):
    import json
    job = json.loads((finished_run / "run" / "job.json").read_text())
    assert job["options"]["function"] == f"{(finished_run / 'uf.py').resolve()}:f"
    assert job["function_sha256"] and job["input"]["particles"] == 20


@pytest.mark.parametrize("change", ["defocus", "order", "count"])
def test_continue_refuses_a_changed_input(finished_run, tmp_path, capsys, change):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    src = finished_run / "input.star"
    original = src.read_bytes()
    from gpu_ali3d.io.formats import read_stack
    stack = read_stack(src)
    if change == "defocus":
        stack.ctf.defocus_u_A *= 1.1
    try:
        if change == "count":
            text = src.read_text().rstrip("\n").splitlines()
            src.write_text("\n".join(text[:-1]) + "\n")             # one particle row fewer
        elif change == "order":                                    # the particle rows reversed, as a user might
            import starfile
            blocks = starfile.read(src, always_dict=True)
            blocks["particles"] = blocks["particles"].iloc[::-1].reset_index(drop=True)
            starfile.write(blocks, src, overwrite=True)
        else:
            write_stack(stack, src, overwrite=True)
        before = _digest(run)
        code, err = _continue(run, capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "input changed" in err and "input.star" in err, err
        assert _digest(run) == before
    finally:
        src.write_bytes(original)


def test_continue_refuses_a_changed_or_inside_function_file(finished_run, tmp_path, capsys):
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    uf = finished_run / "uf.py"
    text = uf.read_text()
    try:
        uf.write_text(text + "# changed\n")
        code, err = _continue(run, capsys)
        assert code == 2 and "changed" in err and "uf.py" in err, err
    finally:
        uf.write_text(text)
    job = json.loads((run / "job.json").read_text())
    (run / "evil.py").write_text("def f(ref_data):\n    raise SystemExit('ran')\n")
    job["options"]["function"] = f"{run / 'evil.py'}:f"
    (run / "job.json").write_text(json.dumps(job))
    code, err = _continue(run, capsys)
    assert code == 2 and "inside the output folder" in err, err


@pytest.mark.parametrize("content", ["{not json", "[]", '{"stack": null}', '{"options": {"maxit": -3}, "stack": null}',
                                     '{"options": {}, "stack": null}', '{"options": {}, "stack": 5, "maskfile": null}'])
def test_continue_refuses_a_corrupt_job_file(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(content)
    code, err = _continue(run, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "job.json" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["job.json"] and (run / "job.json").read_text() == content


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a zip"])
def test_continue_refuses_a_damaged_checkpoint(finished_run, tmp_path, capsys, damage):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    data = (run / "checkpoint.npz").read_bytes()
    (run / "checkpoint.npz").write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                                          "not a zip": b"poses" * 100}[damage])
    before = _digest(run)
    code, err = _continue(run, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{run / 'checkpoint.npz'}: unreadable checkpoint" in err, err
    assert _digest(run) == before


def test_no_compiler_for_the_cpu_kernels_is_one_line(inputs, tmp_path):
    # README: "no C++ compiler found": an empty kernel cache and a PATH with python (and the console script) only
    import os
    import subprocess
    import sys
    before = _digest(inputs)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "GPU_ALI3D_CACHE": str(tmp_path / "cache")}
    env.pop("CXX", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "gpu_ali3d", "refine", str(inputs / "sim.star"), str(out),
                           "--maxit", "1", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "no C++ compiler" in err and "CXX" in err, err
    assert not out.exists() and _digest(inputs) == before


def test_device_gpu_without_a_gpu_is_one_line(inputs, tmp_path, capsys):
    # README: "backend 'gpu' needs cupy" / "no CUDA device is visible"
    from conftest import _gpu_available
    if _gpu_available():
        pytest.skip("a GPU is usable here: --device gpu is not a bad input")
    before = _digest(inputs)
    out = tmp_path / "out"
    assert main(["refine", str(inputs / "sim.star"), str(out), "--maxit", "1", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err, err
    assert not out.exists() and _digest(inputs) == before
