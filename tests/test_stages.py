"""The stage graph in-process (the Ray-free demo), on a real-model path: a base saved to disk."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramix import plan, stages, synthetic
from loramix.config import build_config
from loramix.demo import run_demo
from loramix.model import MixtureModel

pytestmark = pytest.mark.slow


def config(saved_base, tmp_path, **over):
    info = synthetic.write_demo_data(tmp_path / "data", ["reverse", "shift"], train_size=48, eval_size=4)
    general = synthetic.write_jsonl(synthetic.make_rows("copy", 48, seed=0), tmp_path / "data" / "copy.jsonl")
    data = {
        "model": {"base": str(saved_base)},
        "data": {"max_length": 32, "domains": info["domains"], "general": str(general)},
        "expert": {"rank": 2, "steps": 6, "batch_size": 8, "eval_every": 2, "patience": 1},
        "router": {"steps": 3, "batch_size": 8},
    }
    return build_config(data, [f"{k}={v}" for k, v in over.items()])


def test_demo_runs_every_stage_on_a_saved_base(saved_base, tmp_path):
    cfg = config(saved_base, tmp_path)
    report = run_demo(cfg, tmp_path / "out")
    assert set(report["methods"]) == set(plan.METHODS)
    # every method is also scored on the general set (the base's copy skill)
    assert all(0 <= row["general"]["exact_match"] <= 1 for row in report["methods"].values() if "error" not in row)
    training = report["training"]
    experts = [training[f"expert/{d}"] for d in ("reverse", "shift")]
    for t in experts:  # validation every 2 steps, at most 6 steps
        assert t["max_steps"] == 6 and 2 <= t["steps"] <= 6 and t["stopped"] in ("early", "max_steps")
        assert [s for s, _ in t["val_losses"]] == list(range(2, t["steps"] + 1, 2))
    # the multitask baseline gets exactly the steps the experts used together
    assert training["multitask_lora"]["steps"] == sum(t["steps"] for t in experts)
    manifest = json.loads((tmp_path / "out" / "artifact" / "manifest.json").read_text())
    assert manifest["base_model"] == str(saved_base.resolve())
    mm = MixtureModel.from_pretrained(tmp_path / "out" / "artifact")
    assert mm.expert_names == ["reverse", "shift"]
    assert (tmp_path / "out" / "report.md").read_text().startswith("recipe `moa`")
    pattern = report["router"]["gate_pattern"]
    assert pattern["where"] == ["sequence"] and set(pattern["domains"]) == {"reverse", "shift"}
    for name in ("gates.png", "accuracy.png", "confusion.png", "loss_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    again = run_demo(cfg, tmp_path / "out")  # the demo reuses finished stages too
    assert set(again["cached_stages"]) == {s.name for s in plan.build_plan(cfg)}


def test_without_baselines_only_base_oracle_and_mixture_run(saved_base, tmp_path):
    cfg = config(saved_base, tmp_path, baselines=False)
    names = {s.name for s in plan.build_plan(cfg)}
    assert "multitask_lora" not in names and not names & {f"eval/{m}" for m in plan.BASELINES}
    report = run_demo(cfg, tmp_path / "out")
    assert set(report["methods"]) == {"base", "oracle", "mixture"} and "multitask_lora" not in report["training"]
    assert not (tmp_path / "out" / "multitask_lora").exists()


def test_scoring_the_experts_waits_for_the_router_only_while_the_baseline_trains(saved_base, tmp_path):
    """Ordering only: the oracle and merge evaluations do not read the router, nor hash it."""
    from dataclasses import replace

    cfg = config(saved_base, tmp_path)
    evals = {s.name: s for s in plan.build_plan(cfg) if s.name.startswith("eval/")}
    waits = {name for name, s in evals.items() if s.after}
    assert waits == {"eval/oracle", "eval/merge_linear", "eval/merge_ties", "eval/merge_cat"}
    assert all(evals[n].after == ("router",) and "router" not in evals[n].deps for n in waits)
    assert not any(s.after for s in plan.build_plan(config(saved_base, tmp_path, baselines=False)))
    oracle, upstream = evals["eval/oracle"], {d: d for d in evals["eval/oracle"].deps}
    ctx = plan.Context.create(cfg)
    assert oracle.digest(ctx, upstream) == replace(oracle, after=()).digest(ctx, upstream)


def test_loramix_run_submits_a_stage_with_what_it_waits_for_after_what_it_reads(saved_base, tmp_path, monkeypatch):
    """Ray runs a task once every top-level ref it was given exists: the router's among them."""
    import pipelines.run

    launched = {}

    def launch(stage, ctx, digest, progress, upstream):
        launched[stage.name] = upstream
        return stage.name  # the stage's "ref"

    monkeypatch.setattr(pipelines.run, "launch", launch)
    cfg = config(saved_base, tmp_path)
    pipelines.run.submit(cfg, plan.build_plan(cfg), None)
    assert launched["eval/oracle"] == ["base", "expert/reverse", "expert/shift", "router"]
    assert launched["eval/mixture"] == ["base", "router"]


def test_a_bad_row_stops_the_run_before_anything_trains(saved_base, tmp_path):
    from loramix.data import DataError

    cfg = config(saved_base, tmp_path)
    Path(cfg.data.general).write_text('{"prompt": "copy ab=", "answer": "ab"}\n')
    with pytest.raises(DataError, match=r"`data.general`: .* row 1: missing field 'completion'"):
        run_demo(cfg, tmp_path / "out")
    no_eval = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"domains": [cfg.data.domains[0].model_copy(update={"eval": None}), cfg.data.domains[1]]}
            )
        }
    )
    with pytest.raises(DataError, match=r"domain 'reverse' has no `eval` file; .* set `data.domains.0.eval`"):
        run_demo(no_eval, tmp_path / "out")
    assert not (tmp_path / "out" / "base").exists()


def test_missing_eval_split_is_named(saved_base, tmp_path):
    info = synthetic.write_demo_data(tmp_path, ["reverse"], train_size=4, eval_size=2)
    cfg = build_config(
        {
            "model": {"base": str(saved_base)},
            "data": {"domains": [{"name": "reverse", "train": info["domains"][0]["train"]}]},
        }
    )
    tok = stages.load_tokenizer(stages.base_stage(cfg, tmp_path / "unused"))
    with pytest.raises(ValueError, match=r"domain 'reverse' has no `eval` file; set `data.domains\[0\].eval`"):
        stages.eval_examples(cfg, tok)


def test_flan_universal_on_general_data_is_one_of_the_routed_experts(saved_base, tmp_path):
    """MoDULA-Flan: the universal LoRA trains on `universal.train` (general data), the domain experts
    alone, and the router weighs the universal beside them."""
    cfg = config(
        saved_base,
        tmp_path,
        recipe="modula",
        **{
            "universal.enabled": True,
            "universal.steps": 4,
            "universal.rank": 2,
            "universal.batch_size": 8,
            "router.top_k": 3,
        },
    )
    cfg = cfg.model_copy(update={"universal": cfg.universal.model_copy(update={"train": cfg.data.general})})
    out = tmp_path / "out"
    report = run_demo(cfg, out)
    assert report["universal"]["data"].startswith("general data")
    assert report["training"]["universal"]["steps"] <= 4
    universal = load_file(out / "universal" / "adapter_model.safetensors")
    expert = load_file(out / "experts" / "reverse" / "adapter_model.safetensors")
    assert universal.keys() == expert.keys() and all(not torch.equal(universal[k], expert[k]) for k in expert)
    manifest = json.loads((out / "artifact" / "manifest.json").read_text())
    assert manifest["expert_names"] == ["universal", "reverse", "shift"] and manifest["variant"] == "flan"
    assert "error" not in report["methods"]["merge_linear"] and "error" not in report["methods"]["oracle"]
    # the flan experts are plain LoRAs trained alone: the oracle is the expert without the universal
    flan_stage = next(s for s in plan.build_plan(cfg) if s.name == "expert/reverse")
    assert flan_stage.deps == ("base",) and flan_stage.trunk is None


@pytest.mark.parametrize("share", [0.5, 0.2])
def test_universal_domain_share_mixes_a_sample_of_every_domain_into_the_general_data(tmp_path, share):
    """`universal.domain_share`: all of `universal.train`, plus the same seeded sample of each domain,
    together that share of the universal's rows; the stage's key (what the cache compares) changes."""
    cfg = config("unused", tmp_path, recipe="modula", **{"universal.enabled": True})
    cfg = cfg.model_copy(update={"universal": cfg.universal.model_copy(update={"train": cfg.data.general})})
    tok = synthetic.build_tokenizer()
    (alone,) = [s for s in plan.build_plan(cfg) if s.name == "universal"]
    assert [len(r) for r in stages.source_rows(cfg, alone, tok)] == [48]
    mixed_cfg = cfg.model_copy(update={"universal": cfg.universal.model_copy(update={"domain_share": share})})
    (mixed,) = [s for s in plan.build_plan(mixed_cfg) if s.name == "universal"]
    assert [name for name, _ in mixed.sources] == ["general", "reverse", "shift"]
    assert mixed.data_label.endswith(f"+ {share:.0%} of its rows from the domains")
    rows = stages.source_rows(mixed_cfg, mixed, tok)
    per_domain = round(48 * share / (1 - share) / 2)
    assert [len(r) for r in rows] == [48, per_domain, per_domain]
    assert abs(2 * per_domain / (48 + 2 * per_domain) - share) < 0.02
    reverse = stages.examples(cfg, tok, cfg.data.domains[0].train)
    assert all(e in reverse for e in rows[1]) and rows == stages.source_rows(mixed_cfg, mixed, tok)
    # the share is part of the stage's key (what the cache compares): 0.5 and 0.3 are different LoRAs
    other_cfg = cfg.model_copy(update={"universal": cfg.universal.model_copy(update={"domain_share": 0.3})})
    (other,) = [s for s in plan.build_plan(other_cfg) if s.name == "universal"]
    mixed_key = mixed.key(plan.Context.create(mixed_cfg))
    assert mixed_key != alone.key(plan.Context.create(cfg)) and mixed_key != other.key(plan.Context.create(other_cfg))
    # the expert commands pin the files it drew from: the same LoRA, whatever the domains become
    files = [d.train for d in cfg.data.domains]
    pinned_cfg = mixed_cfg.model_copy(
        update={
            "universal": mixed_cfg.universal.model_copy(update={"domain_files": files}),
            "data": mixed_cfg.data.model_copy(update={"domains": mixed_cfg.data.domains[:1]}),
        }
    )
    (pinned,) = [s for s in plan.build_plan(pinned_cfg) if s.name == "universal"]
    assert pinned.key(plan.Context.create(pinned_cfg)) == mixed_key
    assert stages.source_rows(pinned_cfg, pinned, tok) == rows


def test_res_experts_train_on_the_universal_trunk(saved_base, tmp_path):
    cfg = config(
        saved_base,
        tmp_path,
        recipe="modula",
        **{"universal.enabled": True, "universal.variant": "res", "universal.steps": 4, "universal.batch_size": 8},
    )
    out = tmp_path / "out"
    report = run_demo(cfg, out)
    assert report["universal"]["data"].startswith("the union of the domains")
    mm = MixtureModel.from_pretrained(out / "artifact")
    assert mm.variant == "res" and mm.expert_names == ["universal", "reverse", "shift"]
    # Res experts read the trunk's output: A is [r, d_out]; fewer parameters than a flan expert on MLP down
    res = report["training"]["expert/reverse"]
    assert res["trainable_params"] > 0 and report["methods"]["merge_linear"]["error"].startswith("merging experts")
    assert report["methods"]["oracle"]["avg"]["exact_match"] >= 0


@pytest.mark.parametrize("recipe", ["moa", "mole"])
def test_experts_may_adapt_the_lm_head(saved_base, tmp_path, recipe):
    """`expert.target_modules` with `lm_head` trains, saves, mixes, merges and evaluates (the
    held-out `upper` domain needs it: its answers use tokens the base never produced)."""
    targets = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head]"
    cfg = config(saved_base, tmp_path, recipe=recipe, **{"expert.target_modules": targets})
    report = run_demo(cfg, tmp_path / "out")
    assert all("error" not in row for row in report["methods"].values())
    mm = MixtureModel.from_pretrained(tmp_path / "out" / "artifact")
    assert "lm_head" in mm.layers and mm.layers["lm_head"].lora_A.shape[0] == 2 * cfg.expert.rank
