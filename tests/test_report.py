"""The run report: general-skill column, under-trained expert warnings, gate-pattern plot."""

from loramix.config import build_config
from loramix.plan import EvalResult, LoraResult, RouterResult
from loramix.report import write_run_report


def lora(steps, *, stopped="early", still=False, path="x", val_losses=None):
    return LoraResult(
        path,
        steps,
        100,
        0.1,
        1.0,
        [1.0, 0.5],
        10,
        "d",
        stopped=stopped,
        best_step=steps,
        val_losses=val_losses or [[steps, 0.1]],
        still_improving=still,
    )


def scores(em: dict, general=None):
    per = {d: {"exact_match": v, "loss": 0.1} for d, v in em.items()}
    avg = {"exact_match": sum(em.values()) / len(em), "loss": 0.1}
    return EvalResult(per, avg, {"exact_match": general, "loss": 0.2} if general is not None else None)


def test_report_flags_undertrained_experts_and_shows_general_skill(tmp_path):
    cfg = build_config({"data": {"domains": [{"name": "a", "train": "a"}, {"name": "b", "train": "b"}]}})
    results = {
        "expert/a": lora(100, stopped="max_steps", still=True),  # ran out of steps while improving
        "expert/b": lora(40),
        "multitask_lora": lora(140, stopped="max_steps"),
        "router": RouterResult("art", 5, 0.1, 1.0, [0.3], 4),
        "eval/oracle": scores({"a": 0.2, "b": 0.99}, general=1.0),
        "eval/multitask_lora": scores({"a": 0.9, "b": 0.98}, general=0.1),
        "eval/merge_ties": EvalResult(error="PEFT could not merge"),
    }
    mixture = scores({"a": 0.2, "b": 0.99}, general=0.0)
    pattern = {"where": ["sequence"], "experts": ["a", "b"], "domains": {"a": [[1, 0]], "b": [[0, 1]]}}
    router = {"accuracy": 1.0, "confusion": [[2, 0], [0, 2]], "labels": ["a", "b"], "gate_pattern": pattern}
    results["eval/mixture"] = EvalResult(mixture.per_domain, mixture.avg, mixture.general, router=router)
    report = write_run_report(tmp_path, cfg, results, timings={}, cached=[])
    assert len(report["warnings"]) == 1
    warning = report["warnings"][0]
    assert "expert `a` looks under-trained" in warning and "0.200 is below the multitask LoRA's 0.900" in warning
    assert "still falling at step 100" in warning and "Raise `expert.steps`" in warning
    assert report["methods"]["multitask_lora"]["general"]["exact_match"] == 0.1
    assert report["methods"]["merge_ties"] == {"error": "PEFT could not merge"}
    md = (tmp_path / "report.md").read_text()
    assert "| general EM |" in md and "WARNING: expert `a`" in md
    assert (tmp_path / "gates.png").stat().st_size > 0
    # an expert whose loss never took off is told about the LM head
    results["expert/b"] = lora(100, stopped="max_steps", val_losses=[[50, 3.37], [100, 3.36]])
    report = write_run_report(tmp_path, cfg, results, timings={}, cached=[])
    (flat,) = [w for w in report["warnings"] if "expert `b`" in w]
    assert "never fell below 0.5 x its first value 3.370" in flat and "add `lm_head` to `expert.target_modules`" in flat
    assert report["training"]["expert/a"]["stopped"] == "max_steps" and "losses" not in report["training"]["expert/a"]


def test_report_says_whether_the_router_was_warm_started(tmp_path):
    """A warm start shows in report.md and report.json; one that could not be used is a warning."""
    cfg = build_config({"data": {"domains": [{"name": "a", "train": "a"}, {"name": "b", "train": "b"}]}})
    mixture = scores({"a": 0.99, "b": 0.99})
    results = {"expert/a": lora(40), "expert/b": lora(40), "eval/mixture": mixture}
    results["router"] = RouterResult("art", 5, 0.1, 1.0, [0.3], 4, {"from": "out/artifacts/v1", "kept": ["a"]})
    report = write_run_report(tmp_path, cfg, results, timings={}, cached=[])
    assert report["training"]["router"]["warm_start"] == {"from": "out/artifacts/v1", "kept": ["a"]}
    assert "router warm-started from out/artifacts/v1 (rows kept for a)" in (tmp_path / "report.md").read_text()
    assert report["warnings"] == []
    skipped = {"from": "out/artifacts/v9", "skipped": "no such file"}
    results["router"] = RouterResult("art", 5, 0.1, 1.0, [0.3], 4, skipped)
    report = write_run_report(tmp_path, cfg, results, timings={}, cached=[])
    assert report["warnings"] == [
        "router.warm_start out/artifacts/v9 was not used (no such file); the router trained from scratch."
    ]
    assert "warm-started" not in (tmp_path / "report.md").read_text()
