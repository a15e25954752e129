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
