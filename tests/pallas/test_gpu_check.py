"""benchmarks/gpu_check.py: refuses to time on a CPU, isolates a failing part, pairs SSD with the Mamba-1 scan, runs
end to end on a CPU (--quick), times jax's attention kernels as peers."""

from __future__ import annotations

import json
import types

import jax
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
    """run_part's "run" phase times the SSD part's default rows whatever the time; its "variants" phase (two-pass,
    no-split, saved-states) reports all 5 rows as skipped once the deadline has passed, and times them before it."""
    import time

    from benchmarks.gpu import ssd as part

    timed = []
    monkeypatch.setattr(part, "_correctness", lambda quick: [])
    blocks = lambda b, l, h, p, n, quick, blocks="": blocks  # _timing's arguments -> its variant ("": defaults)
    monkeypatch.setattr(part, "_timing", lambda *a: timed.append(blocks(*a)) or {"case": a, "check": "timing"})
    assert len(gpu_check.run_part("ssd", quick=False)) == 2 and timed == ["", ""]  # n = 64 and 128, op defaults
    timed.clear()
    rows = gpu_check.run_part("ssd", quick=False, deadline=time.perf_counter() - 1.0, phase="variants")
    assert not timed and len(rows) == 5 and all(r["check"] == "skipped" and r["case"].split()[-1] in part.VARIANTS
                                                for r in rows), rows
    rows = gpu_check.run_part("ssd", quick=False, deadline=None, phase="variants")
    assert len(rows) == len(timed) == 5 and set(timed) == set(part.VARIANTS), timed
    assert gpu_check.run_part("causal_conv1d", quick=False, phase="variants") == []  # a part without variants


def test_variants_run_after_every_part_s_defaults(monkeypatch, tmp_path):
    calls = []

    def fake_import(name):
        kernel = name.rsplit(".", 1)[1]
        run = lambda quick: calls.append((kernel, "run")) or []
        variants = lambda quick, deadline: calls.append((kernel, "variants")) or []
        return types.SimpleNamespace(run=run, variants=variants)

    monkeypatch.setattr(gpu_check.importlib, "import_module", fake_import)
    assert gpu_check.main(["--quick", "--only", "flash_attention,ssd,selective_scan", "--out",
                           str(tmp_path / "r.json")]) == 0
    assert calls == [("flash_attention", "run"), ("ssd", "run"), ("selective_scan", "run"), ("ssd", "variants"),
                     ("selective_scan", "variants"), ("flash_attention", "variants")]  # the peers last


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="on a device scripts/gpu_check.sh runs the real check")
def test_quick_run_end_to_end(tmp_path, capsys):
    """The whole device script on the CPU (every part interpreted at tiny shapes, then the variants): it must keep
    working between the rare device sessions. Every correctness row passes, and every part and peer has rows."""
    out = tmp_path / "quick.json"
    assert gpu_check.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows, printed = data["rows"], capsys.readouterr().out
    assert {r["kernel"] for r in rows} == set(gpu_check.KERNELS)
    assert all(r["ok"] is not False for r in rows), [r for r in rows if r["ok"] is False]
    assert {r["check"] for r in rows} == {"correctness", "timing"} and data["meta"]["wall_s"] > 0
    (peer,) = [r for r in rows if r["case"].endswith("peer-pallas-triton")]
    diff = float(peer["note"].split("max rel diff ")[1].split()[0])
    print(f"peer row: ours {peer['ms_fwd']:.2f} ms, peer {peer['ms_xla_fwd']:.2f} ms, output diff {diff:.1e}")
    assert peer["ms_xla_fwd"] > 0 and peer["ms_xla_bwd"] is not None and diff < 1e-2
    assert "| flash_attention " in printed and "peer-pallas-triton" in printed


def test_attention_variants_are_skipped_once_the_budget_is_spent():
    import time

    from benchmarks.gpu import flash_attention as part

    rows = part.variants(quick=False, deadline=time.perf_counter() - 1.0)
    assert [r["case"].split()[-1] for r in rows] == ["causal", "bwd-dkv32x32"] + ["peer-mosaic-gpu"] * 3 + [
        "peer-pallas-triton"]
    assert all(r["check"] == "skipped" for r in rows)
