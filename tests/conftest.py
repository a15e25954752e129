import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny import make_adapter  # noqa: E402

# Expert cases: (name, LoraConfig kwargs). Different ranks, alphas, targets and scaling rules.
EXPERTS = [
    ("reverse", dict(r=4, alpha=8)),
    ("sort", dict(r=8, alpha=4)),
    ("shift", dict(r=2, alpha=16, use_rslora=True)),
]


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Three PEFT adapters (nonzero B) on ``tiny_llama(0)``, saved to disk."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(0, root / name, seed=i + 1, **kw) for i, (name, kw) in enumerate(EXPERTS)}


@pytest.fixture(scope="session")
def partial_adapter(tmp_path_factory) -> str:
    """An adapter on attention projections only, with an alpha pattern."""
    root = tmp_path_factory.mktemp("partial")
    return make_adapter(
        0, root / "attn", seed=9, r=4, alpha=8, targets=["q_proj", "v_proj"], alpha_pattern={"v_proj": 2}
    )


@pytest.fixture(scope="session")
def router_adapters(tmp_path_factory) -> dict[str, str]:
    """The same experts as small perturbations (like trained LoRAs), for router training tests.

    Large random deltas make the uniform mixture far from every expert and the LM-loss
    landscape of token routers uninformative; trained LoRAs are small updates.
    """
    root = tmp_path_factory.mktemp("router_adapters")
    return {name: make_adapter(0, root / name, seed=i + 1, b_scale=0.5, **kw) for i, (name, kw) in enumerate(EXPERTS)}


@pytest.fixture(scope="session")
def saved_base(tmp_path_factory):
    """A tiny demo base + tokenizer written with save_pretrained: loaded back like any hub model."""
    from loramix import synthetic

    root = tmp_path_factory.mktemp("base")
    tok = synthetic.build_tokenizer()
    synthetic.build_base(tok, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2).save_pretrained(root)
    tok.save_pretrained(root)
    return root
