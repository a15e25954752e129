"""How many CPUs a LoRA trainer's workers reserve (Ray-free: the cluster's nodes are passed in)."""

from actors.lora_trainer import scaling_config, widened_workers
from loramix.config import build_config


def config(**resources):
    return build_config({"resources": resources})


def test_a_trainer_that_replaces_experts_takes_their_cpus_as_more_workers():
    assert widened_workers(config(), 4, [2.0], 32).count == 2  # the demo machine: both CPUs, one worker each
    assert widened_workers(config(), 4, [8.0, 8.0], 32).count == 4  # what its 4 experts held together
    assert widened_workers(config(cpus_per_worker=2), 4, [4.0, 16.0], 32).count == 4
    assert widened_workers(config(num_workers=2), 4, [2.0], 32).count == 2  # 2 workers already take the 2 CPUs
    assert widened_workers(config(num_workers=2), 4, [4.0, 4.0], 32).count == 8
    assert widened_workers(config(cpus_per_worker=0.5), 4, [1.0], 32).count == 2


def test_stage_tasks_beside_it_still_fit():
    """The router trains beside the multitask baseline on one CPU: neither waits for the other. On
    one machine the baseline's workers reserve a share of the CPUs the router leaves (and use all of
    them once it ends); across nodes they keep whole CPUs and leave the router one."""
    assert widened_workers(config(), 4, [2.0], 32, beside=1) == (2, 0.5)  # the demo machine: both start at once
    assert widened_workers(config(), 4, [4.0], 32, beside=1) == (4, 0.75)
    assert widened_workers(config(), 4, [1.0, 1.0], 32, beside=1) == (1, 1.0)  # half-CPU workers would share a core
    assert widened_workers(config(), 4, [8.0], 32, beside=1) == (4, 1.0)  # room for both
    assert widened_workers(config(), 8, [8.0], 32, beside=1) == (8, 7 / 8)
    assert widened_workers(config(), 8, [8.0, 8.0], 32, beside=1) == (8, 1.0)
    assert widened_workers(config(), 8, [4.0, 4.0], 32, beside=1) == (4, 1.0)  # 7 CPUs left: 4 divide the batch
    assert widened_workers(config(), 4, [1.0], 32, beside=1) == (1, 1.0)  # nothing to share: it waits, as before


def test_only_as_many_workers_as_divide_the_batch():
    assert widened_workers(config(), 3, [16.0], 32).count == 2  # 3 would split 32 rows unevenly
    assert widened_workers(config(), 4, [16.0], 6).count == 3
    assert widened_workers(config(), 4, [16.0], 7).count == 1


def test_experts_gpu_trainers_and_small_clusters_keep_num_workers():
    assert widened_workers(config(), 1, [16.0], 32).count == 1  # an expert
    assert widened_workers(config(use_gpu=True), 4, [16.0], 32).count == 1  # bound by its GPU
    assert widened_workers(config(cpus_per_worker=3), 4, [2.0], 32).count == 1  # never below the setting
    # 32 rows do not split in 3: the worker says so
    assert widened_workers(config(num_workers=3), 4, [2.0], 32).count == 3
    assert widened_workers(config(), 4, [], 32).count == 1


def test_scaling_config_reserves_the_widened_workers():
    scaling = scaling_config(config(), widened_workers(config(), 4, [2.0], 32))
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 1.0}
    shared = scaling_config(config(), widened_workers(config(), 4, [2.0], 32, beside=1))
    assert shared.num_workers == 2 and shared.resources_per_worker == {"CPU": 0.5}
    assert scaling_config(config(use_gpu=True)).resources_per_worker == {"CPU": 1.0, "GPU": 1}
    assert scaling_config(config(num_workers=3)).num_workers == 3


def test_the_plan_widens_only_the_trainers_that_train_while_the_others_wait():
    """The multitask baseline (after every expert) and a MoDULA-Res universal (before every expert)
    may take the experts' CPUs; experts and a Flan universal, which train beside others, may not."""
    from loramix import plan

    domains = [{"name": n, "train": f"{n}.jsonl"} for n in ("a", "b", "c")]
    adapter = {"name": "d", "train": "d.jsonl", "adapter": "lora/d"}  # trained elsewhere: holds no CPU
    for variant, more, universal in (("res", [], 3), ("flan", [adapter], 1), ("res", [adapter], 3)):
        data = {"recipe": "modula", "data": {"domains": domains + more}, "universal": {"enabled": True}}
        data["universal"]["variant"] = variant
        stages = {s.name: s for s in plan.build_plan(build_config(data))}
        assert stages["universal"].replaces == universal
        assert stages["multitask_lora"].replaces == 3 and stages["expert/a"].replaces == 1
        assert stages["multitask_lora"].beside == 1 and stages["universal"].beside == 0  # the router


def test_the_base_stage_takes_a_whole_node_and_other_stage_tasks_one_cpu():
    """Every stage waits for the demo base's pre-training: it may use all of a node's free CPUs."""
    from actors.stage_tasks import task_cpus
    from loramix import plan

    base, router = plan.BaseStage("base"), plan.RouterStage("router", ("base",))
    assert task_cpus(base, [2.0], 2.0) == 2  # the demo machine
    assert task_cpus(base, [2.0, 8.0], 10.0) == 8  # one task runs on one node: the largest
    assert task_cpus(base, [8.0], 3.0) == 3  # another job holds 5: do not wait for them
    assert task_cpus(base, [], 0.0) == 1
    assert task_cpus(router, [8.0], 8.0) == 1


class Rows:
    """A Ray Data dataset as a worker sees it: rows in whatever order its blocks arrived."""

    def __init__(self, rows):
        self.rows = rows

    def iter_rows(self):
        return iter(self.rows)


def test_each_worker_keeps_its_stride_of_the_rows_whatever_order_they_arrive_in():
    from actors.lora_worker import shard_examples

    rows = [{"input_ids": [i, i + 1], "labels": [-100, i + 1]} for i in range(10)]
    shards = [shard_examples(Rows(rows), rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    ids = [e.input_ids[0] for s in shards for e in s]
    assert sorted(ids) == list(range(10))  # disjoint, and together every row
    assert shard_examples(Rows(rows[::-1]), 1, 3) == shards[1]  # a resumed run gets the same rows
    assert shard_examples(Rows(rows), 0, 1) == shard_examples(Rows(rows[::-1]))
