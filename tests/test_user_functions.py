"""user_functions.py: SPARX's ref_ali3d step by step, and loading --function specs."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest

from gpu_ali3d import resolution as R
from gpu_ali3d.user_functions import BUILTIN, load_user_function, ref_ali3d


def _volume(M, rng, centre_xyz=None):
    c = (M // 2,) * 3 if centre_xyz is None else centre_xyz
    z, y, x = np.meshgrid(*([np.arange(M)] * 3), indexing="ij")
    blob = np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 8.0)
    blob += 0.5 * np.exp(-((x - c[0] - 3) ** 2 + (y - c[1] + 2) ** 2 + (z - c[2]) ** 2) / 4.0)
    return 5.0 * blob + 0.2 * rng.standard_normal((M,) * 3) + 1.5     # offset and noisy background


def _curve(M, cutoff=0.22, falloff=0.15):
    freq = np.arange(M // 2 + 1) / M
    full = R.tanl_response(freq, cutoff, falloff)
    return (freq, full / (2 - full), np.ones_like(freq))               # half-map FSC of that full FSC


def test_ref_ali3d_is_background_normalise_mask_filter(rng):
    M = 24
    vol, mask, curve = _volume(M, rng), R.sphere_mask(M, 9), _curve(M)
    out, cs = ref_ali3d([mask, 0, vol, curve])
    outside = vol[mask <= 0.5]                                   # SPARX: infomask(vol, mask, False) = background
    pre = (vol - outside.mean()) / outside.std(ddof=1) * mask
    want = R.filt_tanl(pre, *R.fit_tanh(curve))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cs, [0.0, 0.0, 0.0])
    inside = vol[mask > 0.5]                                     # normalising by the inside would differ
    wrong = R.filt_tanl((vol - inside.mean()) / inside.std(ddof=1) * mask, *R.fit_tanh(curve))
    assert np.abs(wrong - out).max() > 0.1


def test_ref_ali3d_properties(rng):
    M = 24
    vol, mask, curve = _volume(M, rng), R.sphere_mask(M, 9), _curve(M)
    fsc_before = curve[1].copy()
    out, _ = ref_ali3d([mask, 0, vol, curve])
    np.testing.assert_array_equal(curve[1], fsc_before)          # the FSC is not edited in place
    out2, _ = ref_ali3d([mask, 0, 3.0 * vol - 7.0, curve])      # affine changes of the map are normalised away
    np.testing.assert_allclose(out2, out, atol=1e-10)
    out3, _ = ref_ali3d([mask, 0, vol, curve, np.ones((M,) * 3), None])   # MPI's extra items are ignored
    np.testing.assert_array_equal(out3, out)
    # before filtering the map is zero beyond the mask; the low-pass leaks only a little past its edge
    assert np.abs(out[R.sphere_mask(M, 11) == 0]).max() < 0.05 * np.abs(out).max()


def test_ref_ali3d_centres_on_the_phase_centre_of_gravity(rng):
    M = 24
    vol, mask, curve = _volume(M, rng, centre_xyz=(14, 11, 12)), R.sphere_mask(M, 10), _curve(M)
    plain, zero = ref_ali3d([mask, 0, vol, curve])
    centred, cs = ref_ali3d([mask, 1, vol, curve])
    np.testing.assert_allclose(cs, R.phase_centre_of_gravity(plain), atol=1e-12)   # measured after filtering
    assert cs[0] > 1.0 and cs[1] < -0.5                          # the blob sits at +x, -y of the centre
    np.testing.assert_allclose(centred, R.shift_volume(plain, -cs), atol=1e-12)
    np.testing.assert_allclose(R.phase_centre_of_gravity(centred), 0.0, atol=1e-6)
    _, cs_data = ref_ali3d([mask, -1, vol, curve])               # -1 centres the data elsewhere, not here
    np.testing.assert_array_equal(cs_data, zero)


def test_ref_ali3d_errors(rng):
    M = 16
    vol = _volume(M, rng)
    with pytest.raises(ValueError, match="outside"):
        ref_ali3d([np.ones((M,) * 3), 0, vol, _curve(M)])
    with pytest.raises(ValueError, match="constant outside"):
        ref_ali3d([R.sphere_mask(M, 5), 0, 3.0 * R.sphere_mask(M, 5), _curve(M)])
    with pytest.raises(ValueError, match="ref_data"):
        ref_ali3d([R.sphere_mask(M, 5), 0, vol])
    with pytest.raises(ValueError, match="one shape"):
        ref_ali3d([R.sphere_mask(M + 1, 5), 0, vol, _curve(M)])


def test_ref_ali3d_on_the_ribosome_halves(shared_data, rng):
    import mrcfile
    with mrcfile.open(shared_data / "ribosome70S_65.mrc", permissive=True) as f:
        vol = np.asarray(f.data, dtype=np.float64)
    M = vol.shape[0]
    mask = R.sphere_mask(M, M // 2 - 2)
    sigma = vol[mask > 0.5].std()
    halves = [vol + 0.7 * sigma * rng.standard_normal(vol.shape) for _ in range(2)]
    curve = R.fsc_mask(*halves, mask)
    assert curve.fsc[1] > 0.9 and curve.fsc[-1] < 0.3           # good at low, noise at high resolution
    cutoff, falloff = R.fit_tanh(curve)
    assert 0.05 < cutoff < 0.45 and 0 < falloff < 1
    out, _ = ref_ali3d([mask, 0, (halves[0] + halves[1]) / 2, curve])
    assert np.isfinite(out).all()
    assert np.corrcoef(out[mask > 0.5], vol[mask > 0.5])[0, 1] > 0.9   # filtered map resembles the clean one


# ------------------------------------------------------------------------------------------- --function
_MODULE = textwrap.dedent("""
    import numpy as np
    NOT_CALLABLE = 3
    def prepare(ref_data):
        return ref_data[2] * 2.0, np.zeros(3)
""")


def test_load_builtin():
    assert load_user_function("ref_ali3d") is ref_ali3d
    assert BUILTIN["ref_ali3d"] is ref_ali3d


def test_load_from_module(tmp_path, monkeypatch):
    pkg = tmp_path / "myfuncs_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mine.py").write_text(_MODULE)
    (tmp_path / "myfuncs_flat.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("myfuncs_flat:prepare", "myfuncs_pkg.mine:prepare"):
        f = load_user_function(spec)
        vol, cs = f([None, 0, np.ones((2, 2, 2)), None])
        assert vol.sum() == 16.0 and cs.shape == (3,)


def test_load_from_file(tmp_path, monkeypatch):
    path = tmp_path / "sub dir" / "my_user.py"
    path.parent.mkdir()
    path.write_text(_MODULE)
    f = load_user_function(f"{path}:prepare")
    assert f([None, 0, np.ones(3), None])[0].sum() == 6.0
    monkeypatch.chdir(tmp_path / "sub dir")                      # relative to the current directory
    assert load_user_function("my_user.py:prepare")([None, 0, np.ones(2), None])[0].sum() == 4.0


def test_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "badfuncs_mod.py").write_text(_MODULE)
    (tmp_path / "needs_missing_dep.py").write_text("import no_such_dependency_q1\ndef f(r):\n    return r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, match in [("no_such_module_q1:prepare", "no module named 'no_such_module_q1'"),
                        ("badfuncs_mod:missing", "has no attribute 'missing'"),
                        ("badfuncs_mod:NOT_CALLABLE", "not a callable"),
                        ("ref_ali3d_typo", "no built-in user function"),
                        ("badfuncs_mod:", "Python name after the colon"),
                        (":prepare", "Python name after the colon"),
                        ("", "expected")]:
        with pytest.raises(ValueError, match=match) as info:
            load_user_function(spec)
        assert repr(spec) in str(info.value)                     # the message names the spec
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_user_function(str(tmp_path / "absent.py") + ":prepare")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_q1"):   # the user's own import error
        load_user_function("needs_missing_dep:f")
