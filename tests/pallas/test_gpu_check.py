"""benchmarks/gpu_check.py: refuses to time on a CPU, isolates a failing part, pairs SSD with the Mamba-1 scan."""

from __future__ import annotations

import json
import types

import pytest

from benchmarks import gpu_check


def test_cli_errors_exit_2_with_one_line(capsys):
    assert gpu_check.main([]) == 2  # CPU backend, no --quick
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu_check: the default backend is 'cpu'; run on a GPU/TPU, or pass --quick for the interpret-mode smoke test"]
    assert gpu_check.main(["--quick", "--only", "ssd,flash"]) == 2
    assert capsys.readouterr().err.strip() == ("gpu_check: unknown kernel(s) flash; choose from flash_attention, "
                                               "selective_scan, ssd, causal_conv1d")


def _timing(kernel, case, fwd, bwd):
    return {"kernel": kernel, "case": case, "check": "timing", "ms_fwd": fwd, "ms_bwd": bwd}


def test_ssd_rows_are_lined_up_with_the_scan_rows_of_the_same_shape():
    rows = [_timing("selective_scan", "b2 l4096 d2048 n64", 4.0, 8.0), _timing("ssd", "b2 l4096 d2048 n64", 1.0, 3.0),
            _timing("ssd", "b2 l4096 d2048 n128", 1.0, 2.0), _timing("selective_scan", "b2 l4096 d2048 n16", 1, 2)]
    (row,) = gpu_check.ssd_vs_scan(rows)
    assert row["case"] == "b2 l4096 d2048 n64" and row["ok"] is True
    assert row["target"] == "SSD faster than the Mamba-1 kernel: fwd 4.00x, fwd+bwd 3.00x"


def test_a_failing_part_is_reported_and_the_others_still_run(monkeypatch, tmp_path, capsys):
    def fake_import(name):
        if name.endswith(".ssd"):
            raise RuntimeError("Mosaic lowering failed")
        row = {"case": "tiny", "check": "correctness", "max_rel_err": 1e-7, "tol": 1e-5, "ok": True}
        return types.SimpleNamespace(run=lambda quick: [dict(row)])

    monkeypatch.setattr(gpu_check.importlib, "import_module", fake_import)
    out = tmp_path / "r.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 1  # the error row fails the run
    rows = json.loads(out.read_text())["rows"]
    assert [r["kernel"] for r in rows] == list(gpu_check.KERNELS)
    assert rows[2]["check"] == "error" and rows[2]["note"] == "RuntimeError: Mosaic lowering failed"
    assert "| ssd " in capsys.readouterr().out


def test_quick_run_does_not_overwrite_the_device_results(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check.importlib, "import_module", lambda name: types.SimpleNamespace(run=lambda quick: []))
    monkeypatch.setattr(gpu_check.tempfile, "gettempdir", lambda: str(tmp_path))
    assert gpu_check.main(["--quick", "--only", "ssd"]) == 0
    assert (tmp_path / "gpu_check_quick.json").exists()


def test_a_spent_budget_skips_the_optional_rows_but_not_the_defaults(monkeypatch):
    """run_part hands the budget's deadline to a part that takes one; the SSD part then times its default rows and
    reports its variant rows (two-pass, no-split, saved-states) as skipped."""
    import time

    from benchmarks.gpu import ssd as part

    timed = []
    monkeypatch.setattr(part, "_correctness", lambda quick: [])
    monkeypatch.setattr(part, "_timing", lambda *a: timed.append(a[-1]) or {"case": a, "check": "timing"})
    rows = gpu_check.run_part("ssd", quick=False, deadline=time.perf_counter() - 1.0)
    assert timed == ["", ""]  # n = 64 and n = 128 with the op's defaults
    skipped = [r["case"] for r in rows if r["check"] == "skipped"]
    assert len(skipped) == 5 and all(c.split()[-1] in part.VARIANTS for c in skipped), skipped
    rows = gpu_check.run_part("ssd", quick=False, deadline=None)
    assert not [r for r in rows if r["check"] == "skipped"] and timed.count("") == 4 and len(timed) == 9
