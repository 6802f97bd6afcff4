"""Bad inputs, tried as an adversary would (issue 13): each gets exit status 2, one line on stderr that names the
option or file at fault, nothing left behind in the output folder, and the inputs unchanged."""
from __future__ import annotations

import hashlib
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
