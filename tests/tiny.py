"""Tiny models and experts for tests: built in memory, nothing downloaded."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128


class TinyMLP(nn.Module):
    """Linear 10 -> 20 -> 2, like PEFT's ``MLP`` test model."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def tiny_llama(seed: int = 0, layers: int = 2, init_range: float = 0.02) -> LlamaForCausalLM:
    """2-block Llama, hidden 64, vocab 128, float32, eval mode.

    Router tests pass ``init_range=0.15`` (HF's default is 0.02): peaked next-token
    distributions make the choice of expert show in the loss.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init_range,
    )
    return LlamaForCausalLM(cfg).eval()


def make_adapter(
    base_seed: int, path, *, seed: int, r: int = 4, alpha: float = 8, targets="all-linear", b_scale: float = 4.0, **kw
) -> str:
    """Save a PEFT LoRA with random (nonzero) A and B for the tiny Llama of ``base_seed``."""
    base = tiny_llama(base_seed)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # PEFT's non-init is small; make experts clearly distinct
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    peft_model.save_pretrained(str(path))
    return str(path)


def batch(seed: int = 0, b: int = 3, t: int = 7, left_pad: bool = True):
    """Random ids with a ragged (left-padded) attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        if left_pad:
            mask[i, :i] = 0
        else:
            mask[i, t - i :] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
