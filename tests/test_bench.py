"""`loramix bench --quick` runs (as CI does) and writes what it promises; it asserts no speed."""

import json

from benchmarks.bench import run, summary


def test_quick_bench_writes_ratios_and_matches_peft(tmp_path):
    result = run(tmp_path, quick=True)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert (tmp_path / "bench.png").stat().st_size > 0
    f, h, m = result["forward_overhead"], result["heterogeneous_generation"], result["memory"]
    assert f["ratio"] > 0 and 0 < f["theoretical_extra_flops_topk"] <= f["theoretical_extra_flops_as_computed"]
    assert h["outputs_match_peft"] is True  # the timed batched path generates PEFT's tokens
    assert h["speedup_vs_set_adapter"] > 0 and h["speedup_vs_adapter_names"] > 0
    assert 0 < m["ratio"] < 1
    assert "forward: mixture/base" in summary(result)


def test_serving_bench_runs_both_modes_on_one_trace_and_they_agree(tmp_path):
    """`loramix bench --serving` (small): continuous and static batching decode the same trace;
    greedy answers match between them, and every figure is a measured ratio, not an assertion."""
    from benchmarks.serving_bench import run as serving
    from benchmarks.serving_bench import summary as serving_summary

    result = serving(requests=24, rate=400.0, experts=2, hidden_size=32, num_layers=1)
    assert result["greedy_outputs_match"] is True
    for mode in ("static", "continuous"):
        m = result[mode]
        assert m["completion_tokens"] > 0 and 0 < m["ttft_p50_s"] <= m["latency_p99_s"]
    assert result["throughput_ratio"] > 0 and "continuous/static" in serving_summary(result)


def test_loramix_bench_serving_writes_its_json(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["bench", "--serving", "--requests", "8", "--rate", "1000", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serving.json").read_text())
    assert result["config"]["requests"] == 8 and result["greedy_outputs_match"] is True
    assert "continuous/static: throughput" in capsys.readouterr().out


def test_expert_seeds_trains_each_seed_without_early_stopping(saved_base, tmp_path):
    """`benchmarks.expert_seeds` replays one expert over seeds from a run directory: full curves
    (no early stopping), the seed changes the training, and the CLI's child processes run."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.expert_seeds import table, train_one
    from loramix import synthetic
    from loramix.config import build_config, dump_config

    info = synthetic.write_demo_data(tmp_path / "data", ["reverse", "shift"], train_size=48, eval_size=4)
    cfg = build_config(
        {
            "model": {"base": str(saved_base)},
            "data": {"max_length": 32, "domains": info["domains"]},
            "expert": {"rank": 2, "steps": 6, "batch_size": 8, "eval_every": 2, "patience": 1},
        }
    )
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    base = {"base": str(saved_base), "tokenizer": str(saved_base)}  # the base stage's marker
    (run / "stages" / "base.json").write_text(json.dumps({"result": base}))
    a, b = (train_one(str(run), "reverse", seed, ["expert.steps=4"]) for seed in (0, 1))
    assert [s for s, _ in a["curve"]] == [2, 4]  # every validation, to the last step
    assert a["curve"] != b["curve"] and a["learned_at"] is None
    assert "| reverse | 0/2 |" in table([a, b])
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.expert_seeds", str(run), "--domains", "shift", "--seeds", "3"]
        + ["--set", "expert.steps=2", "--output", str(tmp_path / "seeds.jsonl")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| shift | " in done.stdout and json.loads((tmp_path / "seeds.jsonl").read_text())["seed"] == 3
