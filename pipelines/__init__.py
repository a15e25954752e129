"""Ray shells: the `loramix` CLI, the pipeline DAG and trainer construction."""

import os

# Fast tokenizers warn (and can deadlock) when a process forks after using them; Ray workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
