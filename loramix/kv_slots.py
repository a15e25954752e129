"""A KV cache with one slot per running request, for continuous batching (:mod:`loramix.batching`).

transformers' attention layers call ``cache.update(keys, values, layer_idx, ...)`` and attend to
what it returns under the 4D mask they are given: :class:`SlotCache` writes each row at its own
positions and :func:`slot_mask` shows each row only its own tokens, so rows of any length decode
in one forward without re-padding.
"""

from __future__ import annotations

import torch


class SlotCache:
    """A KV cache with one slot per running request: ``K, V [slots, kv_heads, T, head_dim]`` per layer.

    The transformers attention calls :meth:`update` with the new keys/values; each row writes them
    at its own positions (:meth:`bind`), so rows of different lengths decode in one forward with no
    re-padding, and the attention mask (:func:`slot_mask`) hides what a row has not written.
    ``T`` grows (doubling) as rows get longer; rows leave by compaction (:meth:`keep`).
    """

    def __init__(self, config, slots: int, dtype: torch.dtype, device: torch.device):
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = config.num_hidden_layers
        self.k = [torch.zeros(slots, heads, 0, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.start, self.pos, self.length = 0, None, 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions per slot."""
        if length > self.capacity:
            grow = max(length, 2 * self.capacity, 16) - self.capacity
            self.k = [torch.cat([k, k.new_zeros(*k.shape[:2], grow, k.shape[3])], 2) for k in self.k]
            self.v = [torch.cat([v, v.new_zeros(*v.shape[:2], grow, v.shape[3])], 2) for v in self.v]

    def bind(self, start: int, pos: torch.Tensor, length: int) -> None:
        """The next forward's rows are slots ``start..start+b``, writing at ``pos [b, q]`` and
        attending to positions ``[0, length)``."""
        self.reserve(length)
        self.start, self.pos, self.length = start, pos, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b, h, q, d = key_states.shape
        idx = self.pos.view(b, 1, q, 1).expand(b, h, q, d)
        k = self.k[layer_idx][self.start : self.start + b]  # a view: written in place
        v = self.v[layer_idx][self.start : self.start + b]
        k.scatter_(2, idx, key_states.to(k.dtype))
        v.scatter_(2, idx, value_states.to(v.dtype))
        return k[:, :, : self.length], v[:, :, : self.length]

    def keep(self, rows: list[int]) -> None:
        """Keep only slots ``rows`` (in that order) as slots ``0..len(rows)``; only the slots that
        move are copied (:func:`compaction` orders ``rows`` so that is one per slot that left)."""
        moved = [(i, r) for i, r in enumerate(rows) if i != r]
        if not moved:
            return
        device = self.k[0].device
        dst = torch.tensor([i for i, _ in moved], device=device)
        src = torch.tensor([r for _, r in moved], device=device)
        for cache in (self.k, self.v):
            for t in cache:
                t.index_copy_(0, dst, t.index_select(0, src))


def compaction(kept: list[int]) -> list[int]:
    """The surviving slots ``kept`` (ascending) in the order :meth:`SlotCache.keep` moves least:
    slots already below ``len(kept)`` stay, the ones above fill the holes the others left. Every
    row of a step leaving would otherwise shift the whole cache down by one."""
    n, stay = len(kept), set(kept)
    above = [i for i in kept if i >= n]
    return [i if i in stay else above.pop() for i in range(n)]


def slot_mask(pos: torch.Tensor, length: int, attn: str, dtype: torch.dtype) -> torch.Tensor:
    """``[b, 1, q, length]``: query ``(row, i)`` at position ``pos[row, i]`` sees cache positions
    ``<= pos`` (its own row's tokens, causally). Boolean for SDPA; additive for eager attention."""
    keep = torch.arange(length, device=pos.device)[None, None, None, :] <= pos[:, None, :, None]
    if attn == "eager":
        return torch.zeros(keep.shape, dtype=dtype, device=pos.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep
