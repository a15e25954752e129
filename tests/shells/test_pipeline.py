"""`loramix run` / `add-domain` end to end on a real local Ray instance (one per module)."""

import json
import time

import pytest
import torch

from loramix import MixtureModel, versions
from loramix.artifact import read_json
from loramix.config import load_config

from .conftest import small_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPORT_KEYS = {"recipe", "domains", "config_hash", "methods", "router", "training", "timings"}
METHODS = {"base", "oracle", "multitask_lora", "merge_linear", "merge_ties", "merge_cat", "mixture"}


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    from pipelines.run import run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cfg = small_config(root / "data", root / "out", **{"resources.num_workers": 2})
    report = run_pipeline(cfg, root / "out")
    snapshot = {p: p.read_bytes() for p in (root / "out" / "experts").rglob("*") if p.is_file()}
    return cfg, root, report, snapshot


def test_report_has_every_method_and_stage(first_run):
    cfg, root, report, _ = first_run
    assert REPORT_KEYS <= set(report) and set(report["methods"]) == METHODS
    for method in METHODS:
        for domain in ("reverse", "rotate"):
            row = report["methods"][method]["per_domain"][domain]
            assert 0.0 <= row["exact_match"] <= 1.0 and row["loss"] > 0
    assert 0.0 <= report["router"]["accuracy"] <= 1.0 and len(report["router"]["confusion"]) == 2
    assert report == read_json(root / "out" / "report.json")
    for name in ("report.md", "accuracy.png", "confusion.png", "loss_curves.png", "config.yaml"):
        assert (root / "out" / name).stat().st_size > 0, name


def test_experts_trained_with_zero2_on_two_workers(first_run):
    cfg, root, report, _ = first_run
    for job in ("expert/reverse", "expert/rotate", "multitask_lora"):
        t = report["training"][job]
        assert (t["zero_stage"], t["num_workers"]) == (2, 2) and t["node_ids"]
    experts = sum(report["training"][f"expert/{d}"]["steps"] for d in ("reverse", "rotate"))
    assert report["training"]["multitask_lora"]["steps"] == experts  # the same total budget
    files = sorted(p.name for p in (root / "out" / "experts" / "reverse").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    curves = json.loads((root / "out" / "curves.json").read_text())
    assert len(curves["expert/reverse"]) == cfg.expert.steps


def test_artifact_loads_and_routes(first_run):
    cfg, root, report, _ = first_run
    mm = MixtureModel.from_pretrained(root / "out" / "artifact")  # base from the manifest
    assert mm.expert_names == ["reverse", "rotate"]
    gates = mm.route(input_ids=torch.tensor([[5, 6, 7]]))
    assert torch.allclose(gates.sum(-1), torch.ones(1))


def test_rerun_skips_every_stage(first_run):
    from pipelines.run import run_pipeline

    cfg, root, report, snapshot = first_run
    again = run_pipeline(cfg, root / "out")
    assert set(again["cached_stages"]) == {
        "base",
        "expert/reverse",
        "expert/rotate",
        "multitask_lora",
        "router",
        *(f"eval/{m}" for m in METHODS),
    }
    assert again["methods"] == report["methods"]
    assert all(p.read_bytes() == b for p, b in snapshot.items())


def test_bad_config_is_a_clear_cli_error(tmp_path, capsys):
    from pipelines.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: moa\nrouter: {top_k: 3}\ndata: {domains: [{name: a, train: x.jsonl}]}\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "`router.top_k` must be in [1, 1]" in err and "Traceback" not in err
    cfg.write_text("data: {domains: [{name: a, train: missing.jsonl}]}\n")
    assert main(["run", str(cfg), "--output", str(tmp_path / "o")]) == 2
    assert "missing.jsonl' does not exist" in capsys.readouterr().err


def test_modula_with_universal_lora_and_mole_recipes(first_run, tmp_path):
    """Other recipes through the same command: experts are reused, only what depends on the recipe reruns."""
    import shutil

    from pipelines.run import run_pipeline

    cfg, root, report, snapshot = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, ignore=shutil.ignore_patterns("ray_storage"))
    cfg = cfg.model_copy(update={"baselines": False})  # the recipes are under test here, not the baselines
    mole = run_pipeline(cfg.model_copy(update={"recipe": "mole"}), out)
    assert mole["recipe"] == "mole" and {"base", "expert/reverse", "expert/rotate"} <= set(mole["cached_stages"])
    assert "router" not in mole["cached_stages"]
    assert json.loads((out / "artifact" / "router" / "config.json").read_text())["recipe"] == "mole"

    universal = {"enabled": True, "steps": 4, "batch_size": 8, "rank": 4}
    modula = cfg.model_copy(update={"recipe": "modula", "universal": cfg.universal.model_copy(update=universal)})
    report = run_pipeline(modula, out)
    assert report["recipe"] == "modula" and "universal" in report["training"]
    assert "expert/reverse" in report["cached_stages"]  # MoDULA-Flan experts are trained alone: reused
    mm = MixtureModel.from_pretrained(out / "artifact")
    assert mm.expert_names == ["universal", "reverse", "rotate"] and mm.router.recipe == "modula"
    assert set(report["methods"]["mixture"]["per_domain"]) == {"reverse", "rotate"}

    res = modula.model_copy(update={"universal": modula.universal.model_copy(update={"variant": "res"})})
    report = run_pipeline(res, out)  # Res experts read the universal output: trained anew on Ray
    assert "expert/reverse" not in report["cached_stages"] and "universal" in report["cached_stages"]
    mm = MixtureModel.from_pretrained(out / "artifact")
    assert mm.variant == "res" and mm.universal is not None and mm.null_experts == ["universal"]

    # a new domain on a Res run: one Res expert trains on the same trunk, the router starts from the current one
    from loramix.synthetic import make_rows, write_jsonl
    from pipelines.experts import add_domain

    train = write_jsonl(make_rows("shift", 64, seed=0), tmp_path / "shift.train.jsonl")
    evals = write_jsonl(make_rows("shift", 8, seed=1), tmp_path / "shift.eval.jsonl")
    domain_files = [d.train for d in load_config(out / "config.yaml").data.domains]
    new = add_domain(out, "shift", str(train), str(evals))
    assert load_config(out / "config.yaml").universal.domain_files == domain_files  # it drew from the old domains
    assert {"universal", "expert/reverse", "expert/rotate"} <= set(new["cached_stages"])
    assert "expert/shift" not in new["cached_stages"]
    assert new["training"]["router"]["warm_start"]["kept"] == ["universal", "reverse", "rotate"]
    mm = MixtureModel.from_pretrained(out / "artifact")
    assert mm.variant == "res" and mm.expert_names == ["universal", "reverse", "rotate", "shift"]


def test_unschedulable_settings_fail_at_once(first_run, tmp_path):
    """A trainer bigger than the local cluster, or GPUs it does not have: an error naming the
    setting before anything waits (these used to sit idle forever)."""
    from loramix.config import ConfigError
    from pipelines.run import run_pipeline

    cfg, root, _, _ = first_run
    t0 = time.monotonic()
    big = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"cpus_per_worker": 4})})
    with pytest.raises(ConfigError, match=r"`resources.num_workers` x `resources.cpus_per_worker`\) but this cluster"):
        run_pipeline(big, tmp_path / "big")
    gpu = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"use_gpu": True})})
    with pytest.raises(ConfigError, match="no GPU. Set `resources.use_gpu=false`"):
        run_pipeline(gpu, tmp_path / "gpu")
    assert time.monotonic() - t0 < 30


def test_work_that_can_never_be_scheduled_stops_with_a_message(first_run, tmp_path):
    """Resources taken by something else: no stage can start; the run stops after
    `train.stall_timeout_s` naming what waits, instead of hanging."""
    import ray

    from pipelines.progress import Unschedulable
    from pipelines.run import run_pipeline

    cfg, root, _, _ = first_run

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    try:
        stalled = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stall_timeout_s": 5})})
        t0 = time.monotonic()
        with pytest.raises(Unschedulable, match=r"nothing progressed for 5 s .* wait for resources .*needing \{'CPU'"):
            run_pipeline(stalled, tmp_path / "stalled")
        assert time.monotonic() - t0 < 60
    finally:
        ray.kill(hog)
    # The stopped run's stages were cancelled: once the hog is gone, nothing of it takes the CPUs.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # a leaked stage task would be scheduled by now
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert not (tmp_path / "stalled" / "experts").exists()


def test_a_stop_aborts_running_and_waiting_trainers_without_cancelling_tasks(ray_local, tmp_path):
    """What a failed stage or Ctrl-C does to the rest of a run: a training `TorchTrainer` and one
    whose placement group waits for the CPU the first holds are both aborted through the stop
    flag (never `ray.cancel`, whose race with a finishing task aborts the driver), within seconds,
    and every CPU and placement group comes back."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from actors.progress import ProgressActor
    from actors.stage_tasks import Stopped, interrupted_when_stopped, stage_running
    from pipelines.progress import stop_run

    def sleep_forever(config):  # nested: pickled by value (pytest's module names do not import on workers)
        config["progress"].worker.remote(config["name"], 0, ray.get_runtime_context().get_node_id(), 0)  # as ours do
        time.sleep(600)

    @ray.remote(num_cpus=0)
    def stage(progress, name: str, cpus: float):
        with stage_running(progress, name), interrupted_when_stopped(progress, name, poll_s=0.2):
            TorchTrainer(
                sleep_forever,
                train_loop_config={"progress": progress, "name": name},
                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                run_config=RunConfig(name=name, storage_path=str(tmp_path)),
            ).fit()

    progress = ProgressActor.remote()
    refs = {"training": stage.remote(progress, "training", 1), "waiting": stage.remote(progress, "waiting", 2)}
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) > ray.cluster_resources()["CPU"] - 1:  # the worker holds its CPU
        assert time.monotonic() < deadline, "the trainer never started"
        for ref in ray.wait(list(refs.values()), timeout=0.2)[0]:
            ray.get(ref)  # a stage that ended before the stop: show why
    assert ray.get(progress.snapshot.remote())["running"] == ["training", "waiting"]
    t0 = time.monotonic()
    stop_run(refs, progress, "test stop")
    for name, ref in refs.items():
        with pytest.raises(Stopped, match=f"stage `{name}` interrupted: the run was stopped \\(test stop\\)"):
            ray.get(ref, timeout=30)
    assert time.monotonic() - t0 < 30
    assert ray.get(progress.snapshot.remote())["running"] == []
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    # A stage scheduled after the stop refuses to start.
    with pytest.raises(Stopped, match="stage `late` not started"):
        ray.get(stage.remote(progress, "late", 1), timeout=30)


def test_a_slow_stage_is_not_taken_for_a_stall(ray_local):
    """The stall watchdog stops a run only when nothing of it holds resources: a stage that runs
    longer than `stall_timeout_s` without posting progress, while the next one waits for its CPUs,
    is slow, not unschedulable (seen on 2 CPUs under load: a false Unschedulable mid-run)."""
    import ray

    from actors.progress import ProgressActor
    from actors.stage_tasks import stage_running
    from pipelines.progress import wait_with_bars

    @ray.remote(num_cpus=1)
    def slow(progress):
        with stage_running(progress, "slow"):
            time.sleep(4)
        return "slow"

    @ray.remote(num_cpus=2)
    def after(progress):  # needs both CPUs: waits for `slow` to give its one back
        with stage_running(progress, "after"):
            return "after"

    progress = ProgressActor.remote()
    refs = {"slow": slow.remote(progress), "after": after.remote(progress)}
    assert wait_with_bars(refs, progress, stall_timeout_s=1) == {"slow": "slow", "after": "after"}


def test_a_second_writer_on_the_same_output_fails_at_once(first_run, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from loramix.lock import LOCK, LockedError
    from pipelines.run import run_pipeline

    cfg, root, _, _ = first_run
    out = tmp_path / "locked"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "command": "loramix run"}))
        with pytest.raises(LockedError, match=f"in use by pid {other.pid}"):
            run_pipeline(cfg, out)
    finally:
        other.kill()
        other.wait()
    assert os.listdir(out) == [LOCK]  # nothing was started


def test_add_domain_fails_on_bad_rows_untouched_then_trains_one_expert_and_keeps_old_ones(first_run, tmp_path):
    """A new domain whose eval rows are bad fails the add-domain at once, before anything trains:
    the previous config, report and artifact version stay. Fixed and retried, it trains the new
    expert only (the old ones byte-identical, cached), with the router started from the current one."""
    import shutil

    from loramix.data import DataError
    from loramix.synthetic import make_rows, write_jsonl
    from loramix.versions import current
    from pipelines.experts import add_domain

    cfg, root, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, symlinks=True, ignore=shutil.ignore_patterns("ray_storage", ".loramix.lock"))
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "report.json")}
    version = current(out)
    train = write_jsonl(make_rows("sort", 64, seed=0), tmp_path / "sort.train.jsonl")
    evals = tmp_path / "sort.eval.jsonl"
    evals.write_text('{"prompt": "sort abc=", "completion": 5}\n')  # not a string: a data error
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"`data.domains.\d+.eval`: .*row 1: field 'completion' must be a string"):
        add_domain(out, "sort", str(train), str(evals))
    assert time.monotonic() - t0 < 10 and not (out / "experts" / "sort").exists()  # nothing trained
    assert {name: (out / name).read_bytes() for name in before} == before and current(out) == version
    write_jsonl(make_rows("sort", 8, seed=1), evals)
    old = MixtureModel.from_pretrained(out / "artifact").expert_names
    snapshot = {p: p.read_bytes() for p in (out / "experts").rglob("*") if p.is_file()}
    previous = versions.resolve(out)
    new = add_domain(out, "sort", str(train), str(evals))  # not "already exists"
    assert new["domains"][-1] == "sort" and current(out) == version + 1
    assert load_config(out / "config.yaml").router.warm_start == str(previous)  # the router started from it
    assert new["training"]["router"]["warm_start"] == {"from": str(previous), "kept": old}
    info = new["change"]
    assert info["compute_ratio"] <= 1 / 2 and info["expert_steps"] == new["training"]["expert/sort"]["steps"]
    assert set(info["kept_domains"]) == set(old)
    assert {"base", *(f"expert/{d}" for d in old)} <= set(new["cached_stages"]) and "expert/sort" not in new[
        "cached_stages"
    ]
    assert all(p.read_bytes() == b for p, b in snapshot.items())  # old experts byte-identical
    assert MixtureModel.from_pretrained(out / "artifact").expert_names == [*old, "sort"]


def test_add_replace_and_remove_experts_publish_versions(first_run, tmp_path):
    """A LoRA written by plain PEFT code joins the run (add-expert), an expert is retrained on new
    rows (replace-expert) and one is dropped (remove-expert): each a new version recording what
    changed, every other expert byte-identical, the router refreshed."""
    import shutil

    from loramix.synthetic import make_rows, write_jsonl
    from loramix.versions import current, listing
    from pipelines.experts import add_expert, remove_expert, replace_expert
    from tests.test_adapters import plain_peft_lora

    cfg, root, _, _ = first_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, symlinks=True, ignore=shutil.ignore_patterns("ray_storage", ".loramix.lock"))
    config = out / "config.yaml"
    config.write_text(config.read_text().replace("baselines: true", "baselines: false"))  # faster: no baselines

    def weights(version):  # expert name -> its adapter bytes in that version
        folder = out / "artifacts" / f"v{version}" / "experts"
        return {p.parent.name: p.read_bytes() for p in folder.rglob("adapter_model.safetensors")}

    v0, names = current(out), MixtureModel.from_pretrained(out / "artifact").expert_names
    train = write_jsonl(make_rows("swap", 64, seed=0), tmp_path / "swap.train.jsonl")
    lora = plain_peft_lora(root / "out" / "base", tmp_path / "ext")  # the base the copied run names
    evals = write_jsonl(make_rows("swap", 8, seed=1), tmp_path / "swap.eval.jsonl")
    added = add_expert(out, "swap", str(lora), str(train), str(evals))
    assert added["change"]["retrained_stages"] == ["expert/swap", "router"] and current(out) == v0 + 1
    assert MixtureModel.from_pretrained(out / "artifact").expert_names == [*names, "swap"]
    assert listing(out)[-1]["changes"]["experts_added"] == ["swap"]
    assert weights(v0 + 1)["swap"] == (lora / "adapter_model.safetensors").read_bytes()

    rows = write_jsonl(make_rows("reverse", 64, seed=5), tmp_path / "reverse2.jsonl")
    replaced = replace_expert(out, "reverse", train=str(rows))
    assert replaced["change"]["retrained_stages"] == ["expert/reverse", "router"] and current(out) == v0 + 2
    assert listing(out)[-1]["changes"]["experts_replaced"] == ["reverse"]

    removed = remove_expert(out, "swap")
    assert removed["change"]["retrained_stages"] == ["router"] and current(out) == v0 + 3
    assert MixtureModel.from_pretrained(out / "artifact").expert_names == names
    w = {v: weights(v) for v in range(v0, v0 + 4)}
    assert w[v0]["rotate"] == w[v0 + 1]["rotate"] == w[v0 + 2]["rotate"] == w[v0 + 3]["rotate"]  # untouched
    assert w[v0 + 1]["reverse"] == w[v0]["reverse"] != w[v0 + 2]["reverse"] == w[v0 + 3]["reverse"]
    assert "swap" not in w[v0 + 3] and set(removed["change"]["kept_domains"]) == set(names)


def test_the_multitask_baseline_trains_on_the_cpus_its_experts_held(first_run, tmp_path):
    """The baseline replays two experts' steps alone: with one worker per expert on this 2-CPU
    cluster it trains as two data-parallel workers of one thread each (the experts' CPUs)."""
    from actors.lora_trainer import fit_lora
    from loramix import stages
    from loramix.messages import BaseResult

    cfg, root, report, _ = first_run
    assert {report["training"][f"expert/{d}"]["cpu_threads"] for d in ("reverse", "rotate")} == {1}
    one = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"num_workers": 1})})
    base = BaseResult(**read_json(root / "out" / "stages" / "base.json")["result"])
    rows = stages.examples(one, stages.load_tokenizer(base), cfg.data.domains[0].train)
    spec = stages.LoraSpec("multitask_lora", one.expert, rows, [], None, str(tmp_path / "mt"), "all", replaces=2)
    result = fit_lora(spec, one, base, "multitask-wide")
    assert result.num_workers == 2 and result.cpu_threads == 1 and result.steps == one.expert.steps
