"""Ray shells are tested on one real local Ray instance per module (a Ray start costs ~10 s)."""

import os

import pytest
import ray._private.auto_init_hook as auto_init

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# A stray thread (a Serve handle's, a deploy's) that calls Ray after a module's `ray.shutdown()`
# must fail, not start a second local Ray in this process: the next module's `ray.init` raced it,
# and the process exited 60 s later on a lost GCS with no error printed (two CI runs, in test_train).
auto_init.enable_auto_connect = False


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    ray.shutdown()


def small_config(data_dir, output, tasks=("reverse", "rotate"), **over):
    """A tiny pipeline: 2-layer width-32 base, a few steps per stage, 64 rows per domain."""
    from loramix.config import build_config
    from loramix.synthetic import write_demo_data

    info = write_demo_data(data_dir, list(tasks), train_size=64, eval_size=8)
    data = {
        "output": str(output),
        "model": {
            "synthetic": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 2,
                "pretrain_steps": 10,
                "batch_size": 16,
            }
        },
        "data": {"max_length": 32, "eval_limit": 8, "domains": info["domains"]},
        "expert": {"rank": 4, "steps": 4, "batch_size": 8},
        "router": {"steps": 4, "batch_size": 8},
        "train": {"zero_stage": 2, "log_every": 2, "checkpoint_every": 2},
    }
    return build_config(data, [f"{k}={v}" for k, v in over.items()])
