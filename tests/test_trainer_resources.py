"""How many CPUs a LoRA trainer's workers reserve (Ray-free: the cluster's nodes are passed in)."""

from actors.lora_trainer import scaling_config, widened_cpus
from loramix.config import build_config


def config(**resources):
    return build_config({"resources": resources})


def test_a_trainer_that_replaces_experts_takes_their_cpus_where_a_node_has_them():
    assert widened_cpus(config(), 4, [2.0]) == 2.0  # the demo machine: both CPUs
    assert widened_cpus(config(), 4, [8.0, 8.0]) == 4.0  # what its 4 experts held together
    assert widened_cpus(config(cpus_per_worker=2), 4, [4.0, 16.0]) == 8.0
    assert widened_cpus(config(num_workers=2), 4, [2.0]) == 1.0  # 2 workers share the 2 CPUs
    assert widened_cpus(config(num_workers=2), 4, [4.0, 4.0]) == 4.0


def test_experts_gpu_trainers_and_small_clusters_keep_cpus_per_worker():
    assert widened_cpus(config(), 1, [16.0]) == 1.0  # an expert
    assert widened_cpus(config(use_gpu=True), 4, [16.0]) == 1.0  # bound by its GPU
    assert widened_cpus(config(cpus_per_worker=0.5), 4, [1.0]) == 1.0
    assert widened_cpus(config(cpus_per_worker=3), 4, [2.0]) == 3.0  # never below the setting
    assert widened_cpus(config(), 4, []) == 1.0


def test_scaling_config_reserves_the_widened_cpus():
    scaling = scaling_config(config(), 2.0)
    assert scaling.num_workers == 1 and scaling.resources_per_worker == {"CPU": 2.0}
    assert scaling_config(config(use_gpu=True)).resources_per_worker == {"CPU": 1.0, "GPU": 1}


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
