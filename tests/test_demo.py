"""README's first command: `gpu-ali3d demo` must end well below a degree (issue 14), as its printed line says."""
from __future__ import annotations

from gpu_ali3d.demo import run_demo


def test_the_demo_with_its_defaults_ends_well_below_a_degree(tmp_path, capsys):
    report = run_demo(tmp_path / "demo", progress=False)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("pose error against the truth"), line
    assert report["start"]["angle_deg"] > 3.5 and report["start"]["shift_px"] > 1.0
    assert report["result"]["angle_deg"] < 0.75 and report["result"]["shift_px"] < 0.25, report
    assert f"refined {report['result']['angle_deg']:.2f} deg" in line
