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
