"""Smoke test of benchmarks/hf_vs_template.py on a few real SST-2 sentences (slow: it loads
the packaged MiniLM in several subprocesses; skipped without ../shared/data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nlp_transfer.utils.resolvers import PROJECT_ROOT


@pytest.mark.slow
def test_benchmark_runs_both_sides_and_reports(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "benchmarks/hf_vs_template.py",
        "--task=sst2",
        f"--data-dir={shared_data / 'sst2'}",
        "--max-train=64",
        "--max-eval=32",
        "--skip-peak",
        "--hf-variant=bf16_frozen",
        "--template-variant=trainer=bf16 strategy=frozen features.cache=true",
        "--template-variant=trainer=bf16",
        f"--json-out={out}",
    ]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| HF bf16, frozen encoder |" in proc.stdout
    rows = json.loads(out.read_text())["runs"]
    assert len(rows) == 3
    for row in rows:
        assert row["steps"] == 2 and row["real_tokens"] > 0
        assert 0.0 <= row["metric"] <= 1.0


def test_paired_ratios_compare_runs_of_the_same_round() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "hf_vs_template", PROJECT_ROOT / "benchmarks" / "hf_vs_template.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    specs = [
        {"kind": "hf", "label": "HF a"},
        {"kind": "hf", "label": "HF b"},
        {"kind": "template", "label": "template: x"},
    ]
    runs = [  # round 0: HF best 60 s; round 1 (slower machine): HF best 70 s
        {"kind": "hf", "label": "HF a", "round": 0, "train_s": 60.0},
        {"kind": "hf", "label": "HF b", "round": 0, "train_s": 80.0},
        {"kind": "template", "label": "template: x", "round": 0, "train_s": 50.0},
        {"kind": "hf", "label": "HF a", "round": 1, "train_s": 70.0},
        {"kind": "hf", "label": "HF b", "round": 1, "train_s": 90.0},
        {"kind": "template", "label": "template: x", "round": 1, "train_s": 50.0},
        {"kind": "hf", "label": "HF a", "round": 2, "train_s": 66.0},
        {"kind": "hf", "label": "HF b", "round": 2, "train_s": 99.0},
        {"kind": "template", "label": "template: x", "round": 2, "train_s": 60.0},
    ]
    (line,) = bench.paired_ratios(runs, specs)
    assert "per round 1.20, 1.40, 1.10" in line
    assert line.endswith("median 1.20x")


def _load(name: str):
    import importlib.util

    path = PROJECT_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_mfu_uses_the_matmul_peak_of_each_runs_precision() -> None:
    bench = _load("hf_vs_template")
    peak = {"bf16_gflops": 400.0, "fp32_gflops": 100.0}
    base = {
        "kind": "template",
        "train_s": 10.0,
        "real_tokens": 10_000,
        "padded_tokens": 10_000,
        "examples": 100,
        "peak_rss_mb": 1.0,
        "metric_name": "val/f1",
        "metric": 0.5,
        "params_nonembedding": 1_000_000,
        "total_s": 12.0,
    }
    rows = [
        {**base, "label": "fp32 run", "precision": "32-true"},
        {**base, "label": "bf16 run", "precision": "bf16-mixed"},
        {**base, "label": "HF fp32", "precision": "fp32", "kind": "hf"},
    ]
    # 6 x 1e6 x 1000 tokens/s = 6 GFLOP/s: 6 % of the fp32 peak, 1.5 % of the bf16 one
    lines = bench.table(rows, peak, 1).splitlines()
    assert "| 6.0 % |" in lines[2] and "| 1.5 % |" in lines[3] and "| 6.0 % |" in lines[4]
    assert bench.peak_gflops_for("16-mixed", peak) == 400.0
    assert bench.peak_gflops_for("32-true", None) is None
    no_fp32 = bench.table(rows[:1], {"bf16_gflops": 400.0, "fp32_gflops": None}, 1)
    assert "| n/a |" in no_fp32.splitlines()[2]


def test_results_of_another_machine_are_refused(tmp_path: Path) -> None:
    from nlp_transfer.training.hardware import fingerprint

    bench = _load("hf_vs_template")
    here = fingerprint()
    path = tmp_path / "runs.json"
    assert bench.load_comparable(path, here) is None  # nothing earlier
    path.write_text(json.dumps({"hardware": here, "peak": None, "runs": []}))
    assert bench.load_comparable(path, here)["runs"] == []
    other = {**here, "cpu_flags": ["avx2"], "cpu_native_bf16": False}
    path.write_text(json.dumps({"hardware": other, "runs": []}))
    with pytest.raises(SystemExit, match="other hardware.*cpu_flags"):
        bench.load_comparable(path, here)
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(SystemExit, match="no hardware fingerprint"):
        bench.load_comparable(path, here)
    settings = bench.comparable_settings(bench.parse_args(["--task=sst2"]))
    path.write_text(json.dumps({"hardware": here, "settings": settings, "runs": []}))
    assert bench.load_comparable(path, here, settings) is not None
    other_work = bench.comparable_settings(bench.parse_args(["--task=sst2", "--max-train=8"]))
    with pytest.raises(SystemExit, match="other settings"):
        bench.load_comparable(path, here, other_work)


def test_hf_defaults_follow_the_hardware_kind() -> None:
    bench = _load("hf_vs_template")
    assert bench.DEFAULT_HF["cpu"] == ["fp32", "fp32_grouped"]  # no emulated bf16
    assert "bf16_grouped" in bench.DEFAULT_HF["cpu_bf16"]
    assert bench.DEFAULT_HF["cuda"] == ["bf16_grouped_fused"]
    assert all(v in bench.HF_VARIANTS for vs in bench.DEFAULT_HF.values() for v in vs)


def test_speed_mechanism_plan_flips_each_knob_and_pairs_rounds(capsys) -> None:
    from nlp_transfer.training.hardware import AUTO_TABLE, MEASURED_ON, SPEED_KNOBS

    speed = _load("speed_mechanisms")
    for kind in AUTO_TABLE:
        rows = speed.plan(kind)
        assert rows[0]["variant"] == "defaults"
        flipped = {r["mechanism"]: r["variant"] for r in rows[1:]}
        for knob, key in SPEED_KNOBS.items():
            assert flipped[knob] == f"{key}={str(not AUTO_TABLE[kind][knob]).lower()}"
        assert flipped["lazy_adamw"] == "optimizer=lazy_adamw"
    rows = speed.plan("cpu")
    runs = [
        {"variant": v, "round": r, "train_s": t, "metric": 0.5}
        for r in (0, 1, 2)
        for v, t in (("defaults", 10.0), ("encoder.fast_dropout=false", 12.0 + r))
    ]
    table = speed.summarise(runs, rows, "cpu")
    measured = "yes" if "fast_dropout" in MEASURED_ON.get("cpu", ()) else "no"
    assert f"| fast_dropout | on | {measured} | 10.0 | 13.0 | 1.300x | yes |" in table
    assert speed.main(["--dry-run"]) and "plan: python benchmarks/hf_vs_template.py" in (
        capsys.readouterr().out
    )


def test_speed_table_tests_paired_phase_savings_and_pools_json_files(tmp_path, capsys) -> None:
    from nlp_transfer.training.hardware import fingerprint

    speed = _load("speed_mechanisms")
    noise = (0.3, -0.4, 0.2, -0.1, 0.5, -0.6, 0.1, -0.2)  # whole-run noise, no sign
    runs = []
    for r, eps in enumerate(noise):
        for variant, opt in (("defaults", 20.0), ("model.clip_norm_shortcut=false", 25.0 + eps)):
            ms = {"data": 2.0, "forward": 100.0 + eps, "backward": 150.0 - eps, "optimizer": opt}
            runs.append(
                {
                    "kind": "template",
                    "variant": variant,
                    "round": r,
                    "train_s": 30.0 + (eps if variant == "defaults" else -eps),
                    "metric": 0.5,
                    "ms_per_step": ms,
                    "hardware_kind": "cpu",
                }
            )
    table = speed.summarise(runs, speed.plan("cpu"), "cpu")
    row = next(line for line in table.splitlines() if line.startswith("| clip_norm_shortcut"))
    # the optimizer saves 5 ms in all 8 rounds: the smallest exact p of 8 pairs, 2/2^8
    assert "optimizer 5.0 (p 0.008)" in row and "| 0.008 |" not in row  # whole run: noise
    hw = fingerprint()
    settings = {"task": "conll2003", "max_train": 3000}
    files = []
    for i, part in enumerate((runs[:8], runs[8:])):  # both files number their rounds 0-3
        data = {
            "hardware": hw,
            "settings": settings,
            "runs": [dict(r, round=r["round"] % 4) for r in part],
        }
        files.append(str(tmp_path / f"{i}.json"))
        Path(files[-1]).write_text(json.dumps(data))
    pooled, _ = speed.load_runs(files)
    assert len({r["round"] for r in pooled}) == 8  # the files' rounds stay apart
    speed.main(["--from-json", *files])
    out = capsys.readouterr().out
    assert "8 rounds from 2 file(s)" in out and "optimizer 5.0 (p 0.008)" in out
    with pytest.raises(SystemExit, match="given twice"):
        speed.load_runs([files[0], files[0]])
    other = {"hardware": {**hw, "mkl_isa_limit": "AVX2" if not hw["mkl_isa_limit"] else None}}
    (tmp_path / "2.json").write_text(json.dumps({**data, **other}))
    with pytest.raises(SystemExit, match="mkl_isa_limit"):
        speed.load_runs([files[0], str(tmp_path / "2.json")])
    (tmp_path / "old.json").write_text(json.dumps({"hardware": hw, "runs": data["runs"]}))
    with pytest.raises(SystemExit, match="no settings"):
        speed.load_runs([str(tmp_path / "old.json")])
    assert speed.paired_p([0.0, 0.0, 0.0]) == "n/a" and speed.paired_p([1.0]) == "n/a"
    assert speed.phase_saving([({"train_s": 1.0}, {"train_s": 2.0})]) == "n/a"


def test_gpu_check_script_parses_and_its_plan_validates_on_cpu(tmp_path: Path, capsys) -> None:
    proc = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=PROJECT_ROOT)
    assert proc.returncode == 0
    check = _load("gpu_check")
    assert check.main(["--dry-run", f"--out-dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for step in ("environment", "gpu-tests", "conll", "conll-compiled", "sweep"):
        assert f"[{step}]" in out
    assert "dry run: plan valid" in out and "bf16_grouped_fused_compiled" in out
    assert not list(tmp_path.iterdir())  # nothing run, nothing written
    good = {
        "hardware": "cuda",
        "precision": "bf16-mixed",
        "speed": dict.fromkeys(check.CPU_ONLY, False),
    }
    assert check.cpu_mechanism_problems(good, "x") == []
    bad = {**good, "hardware": "cpu", "speed": {**good["speed"], "fast_dropout": True}}
    assert check.cpu_mechanism_problems(bad, "x") == [
        "x: fast_dropout is on",
        "x: trained on cpu, not cuda",
    ]
