"""RefineOptions: SPARX defaults and validation with messages that name the option."""
import pytest

from gpu_ali3d.options import RefineOptions


def test_defaults_are_sparx_command_line_defaults():
    o = RefineOptions()
    # sxlocal_ali3d.py's current defaults (spec/local_ali3d.md, errata: --ts 2 and --center 0 since 2015)
    assert (o.ou, o.delta, o.ts, o.maxit, o.chunk, o.center) == (-1, 2.0, 2.0, 10, 1.0, 0)
    assert (o.CTF, o.sym, o.function, o.npad) == (False, "c1", "ref_ali3d", 2)
    # deliberate deviation: SPARX's fixed --snr 1.0 becomes "measured", which is 1.0 on noisy data
    # (tests/test_measured_snr.py)
    assert o.snr == "measured"
    assert (o.device, o.write_headers) == ("auto", False)


@pytest.mark.parametrize("kwargs, flag", [
    (dict(ou=0), "--ou"), (dict(ou=-5), "--ou"), (dict(delta=0.0), "--delta"), (dict(delta=120.0), "--delta"),
    (dict(ts=-1.0), "--ts"), (dict(maxit=-1), "--maxit"), (dict(chunk=0.0), "--chunk"), (dict(chunk=1.5), "--chunk"),
    (dict(center=2), "--center"), (dict(snr=0.0), "--snr"), (dict(sym="c0"), "c0"), (dict(sym="x7"), "x7"),
    (dict(function="not a function"), "--function"), (dict(npad=0), "--npad"), (dict(device="tpu"), "--device"),
    (dict(batch=-1), "--batch"), (dict(interpolation="cubic"), "--interpolation"),
])
def test_bad_values_name_the_option(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        RefineOptions(**kwargs)


def test_integer_options_refuse_floats():
    with pytest.raises(TypeError, match="maxit"):
        RefineOptions(maxit=2.5)


@pytest.mark.parametrize("function", ["ref_ali3d", "mypkg.filters:prepare", "my_functions.py:prepare"])
def test_function_forms_accepted(function):
    assert RefineOptions(function=function).function == function


def test_outer_radius_against_the_box():
    assert RefineOptions().outer_radius(64) == 30
    assert RefineOptions(ou=31).outer_radius(64) == 31
    with pytest.raises(ValueError, match=r"--ou 80 is larger than a 128-pixel box allows; use --ou <= 63"):
        RefineOptions(ou=80).outer_radius(128)
