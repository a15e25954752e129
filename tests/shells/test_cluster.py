"""Two Ray nodes on this machine: the quickstart pipeline as the README submits it, spread over
both; the job stopped and resubmitted resumes instead of starting over."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from loramix.artifact import read_json

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    yield cluster, f"http://{url}"
    ray.shutdown()
    cluster.shutdown()


ENV = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[2]
TINY = (
    "model.synthetic.hidden_size=32 model.synthetic.intermediate_size=64 model.synthetic.num_layers=2 "
    "model.synthetic.num_heads=2 model.synthetic.pretrain_steps=10 expert.steps=40 expert.batch_size=8 "
    "router.steps=4 router.batch_size=8 data.eval_limit=4"
)


def submit(url: str, config_path, output, tag: str, *, working_dir=None, extra: str = ""):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    runtime_env = {"env_vars": ENV} | ({"working_dir": str(working_dir)} if working_dir else {})
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m pipelines.cli run {config_path} --output {output} {extra}",
        submission_id=f"loramix-{tag}-{time.time_ns()}",
        runtime_env=runtime_env,
    )
    return client, job


def wait(client, job, timeout=600, until=None):
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) or (until and until()):
            return status
        time.sleep(0.25 if until else 1)  # a stop must land while a checkpointed trainer still trains
    raise TimeoutError(f"job {job} still {client.get_job_status(job)} after {timeout}s")


def checkpointed_unfinished(out: Path) -> set[str]:
    """Trainer runs with a mid-training checkpoint and no finished-stage marker yet."""
    # A checkpoint counts once Ray Train registered it in the run's snapshot (files alone may be mid-upload).
    storage = out / "ray_storage"
    snapshots = storage.glob("*/checkpoint_manager_snapshot.json") if storage.exists() else []
    runs = {p.parent.name for p in snapshots if json.loads(p.read_text())["checkpoint_results"]}
    done = {p.stem.replace("__", "-") for p in (out / "stages").glob("*.json")} if (out / "stages").exists() else set()
    return {r for r in runs if r.rsplit("-", 1)[0] not in done}


def test_readme_cluster_command_spreads_over_both_nodes_and_resumes_when_resubmitted(two_nodes, tmp_path):
    """`ray job submit --working-dir . -- loramix run configs/quickstart.yaml --output DIR`, as the
    README shows it: the config's relative demo paths are written in the job's working directory
    (which only the driver's node has) and must still reach every task. The job is stopped once a
    trainer has checkpointed; submitted again, it keeps the finished stages, resumes the
    checkpointed trainers from their checkpoints, and the four experts train on both nodes.
    (One test for both: each job submission costs a driver, a base stage and Ray Train starts.)"""
    cluster, url = two_nodes
    out = tmp_path / "out"
    extra = f"{TINY} train.checkpoint_every=4"

    client, job = submit(url, "configs/quickstart.yaml", out, "stop", working_dir=ROOT, extra=extra)
    wait(client, job, until=lambda: bool(checkpointed_unfinished(out)))
    client.stop_job(job)
    assert str(wait(client, job)) == "STOPPED"
    partial = checkpointed_unfinished(out)
    assert partial, "the job ended before any checkpoint; the stop tested nothing"

    client, job = submit(url, "configs/quickstart.yaml", out, "resume", working_dir=ROOT, extra=extra)
    assert str(wait(client, job)) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
    report = read_json(out / "report.json")
    assert "base" in report["cached_stages"]
    for run in partial:  # e.g. expert-reverse-<hash> -> stages/expert__reverse.json
        marker = read_json(out / "stages" / (run.rsplit("-", 1)[0].replace("-", "__", 1) + ".json"))["result"]
        assert marker["resumed_from"] >= 4, (run, marker)
    assert set(report["methods"]["mixture"]["per_domain"]) == {"reverse", "rotate", "shift", "swap"}
    nodes = {n for name, t in report["training"].items() if name.startswith("expert/") for n in t["node_ids"]}
    assert len(nodes) == 2, report["training"]
    multitask = report["training"]["multitask_lora"]  # one worker: the router trains on the other CPU meanwhile
    assert multitask["num_workers"] == 1 and len(multitask["node_ids"]) == 1, multitask
    assert "reverse" in client.get_job_logs(job)  # the report table reached the job's log
    used = yaml.safe_load((out / "config.yaml").read_text())["data"]["domains"][0]["train"]
    assert used.startswith(str(out / "inputs")) and Path(used).is_file()  # shipped to storage every node sees
