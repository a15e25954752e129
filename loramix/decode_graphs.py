"""CUDA graphs for the continuous-batching decoding step (:mod:`loramix.batching`).

On a GPU one decoding step of a small or mid-sized model is a few hundred kernel launches that
each do microseconds of work: the step is bound by launching them, not by the GPU. A CUDA graph
launches the whole step at once. As vLLM and SGLang do, one graph is captured per batch-size
bucket (and here per cache-length bucket), the first time a step needs it; rows pad up to the
bucket with rows that write only into free KV-cache slots.

Everything a step reads lives in static buffers that are the graph's inputs: each row's token
and position, its gates (fixed weights: explicit, pinned or a sequence router's; MoLE's block
gates) and a token router's running context sums (which the step advances in place). So any mix
of experts, per row, replays the same graph; the rank gates are computed from the gates inside
it. Graphs need the launch-lean layer path (every expert's ranks, gates zero the rest:
:data:`loramix.layers.GPU_ALL_RANKS_MAX`); a mixture with more ranks decodes eagerly, and so
does a batch whose capture fails (logged once).

On a CPU nothing is captured. ``EMULATE_ON_CPU`` (tests) runs the same static-buffer path
eagerly, replaying the step function instead of a graph, so the bookkeeping is tested without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext

import torch

from loramix.layers import GPU_ALL_RANKS_MAX
from loramix.routing import CallState

logger = logging.getLogger(__name__)

EMULATE_ON_CPU = False  # tests: run the graph path's buffers and replays on a CPU (no capture)


def batch_bucket(rows: int, slots: int) -> int:
    """Rows a graph is captured for: 1, 2, 4, 8, then multiples of 8 (vLLM's buckets), at most ``slots``."""
    bucket = 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
    return min(bucket, slots)


def length_bucket(length: int) -> int:
    """Cache positions a graph attends over: a power of two, at least 16 (the cache grows the same way)."""
    return max(16, 1 << (length - 1).bit_length())


class _Emulated:
    """A CPU stand-in for a captured graph: replay reruns the step into a static output."""

    def __init__(self, step: Callable[[], torch.Tensor]):
        self.step, self.out = step, None

    def replay(self) -> torch.Tensor:
        result = self.step()
        if self.out is None:
            self.out = result.clone()
        else:
            self.out.copy_(result)
        return self.out


class _Captured:
    def __init__(self, step: Callable[[], torch.Tensor], pool):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out = step()
        self.pool = self.graph.pool()  # the next graphs share its memory (they never run at once)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class StepGraphs:
    """The decoding step of one :class:`loramix.batching._Batch` as graphs (see the module docstring).

    Use :meth:`for_batch` (None where graphs do not apply), then :meth:`decode` in place of the
    eager forward.
    """

    def __init__(self, batch):
        self.batch = batch
        self.engine, self.cache = batch.engine, batch.cache
        self.slots = self.cache.k[0].shape[0]
        device = self.cache.k[0].device
        self.io = torch.zeros(2, self.slots, 1, dtype=torch.long, device=device)  # tokens, positions
        self.state: dict[tuple, dict[str, torch.Tensor]] = {}  # static state buffers per state layout
        self.graphs: dict[tuple, _Captured | _Emulated] = {}
        self.capacity = self.cache.capacity
        self.pool = None  # the first graph's memory pool, shared by the rest
        self.cuda = device.type == "cuda"
        self.broken = False

    @classmethod
    def for_batch(cls, batch, enabled: bool) -> StepGraphs | None:
        device = batch.cache.k[0].device
        if not enabled or not (device.type == "cuda" or EMULATE_ON_CPU):
            return None
        mixture = batch.engine.mixture
        if mixture is not None and any(layer.ranks > GPU_ALL_RANKS_MAX for layer in mixture.layers.values()):
            logger.info("more than %d LoRA ranks in a layer: decoding runs eagerly", GPU_ALL_RANKS_MAX)
            return None
        return cls(batch)

    # ------------------------------------------------------------------------------ state
    @staticmethod
    def _tensors(call: CallState | None) -> dict[str, torch.Tensor]:
        """The per-row decoding state a step reads, by name (``[rows, ...]`` each)."""
        if call is None:
            return {}
        out = {f"gates.{b}": t for b, t in call.block_gates.items()}
        for key, (total, count) in call.prefix.items():
            out[f"sum.{key}"], out[f"count.{key}"] = total, count
        if call.weights is not None:
            out["weights"] = call.weights
        return out

    def _buffers(self, layout: tuple, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if layout not in self.state:
            self.state[layout] = {
                n: torch.zeros((self.slots, *t.shape[1:]), dtype=t.dtype, device=t.device) for n, t in tensors.items()
            }
        return self.state[layout]

    @staticmethod
    def _call_over(buffers: dict[str, torch.Tensor], rows: int) -> CallState:
        """A decoding CallState whose tensors are the first ``rows`` rows of ``buffers``."""
        call = CallState(freeze=True)
        for name, t in buffers.items():
            kind, _, key = name.partition(".")
            if kind == "gates":
                call.block_gates[int(key)] = t[:rows]
            elif kind == "sum":
                call.prefix[key] = (t[:rows], buffers[f"count.{key}"][:rows])
        if "weights" in buffers:
            call.weights = buffers["weights"][:rows]
        return call

    # ------------------------------------------------------------------------------ stepping
    def decode(self, tokens: list[int], positions: list[int], length: int) -> torch.Tensor | None:
        """Logits ``[rows, vocab]`` of one decoding step of the batch's first ``len(tokens)`` rows
        (their last tokens at ``positions``, attending to ``length`` positions), or None: decode eagerly."""
        if self.broken:
            return None
        rows, call = len(tokens), self.batch.call
        bucket, span = batch_bucket(rows, self.slots), length_bucket(length)
        self.cache.reserve(span)
        if self.cache.capacity != self.capacity:  # the cache grew: graphs hold the old tensors
            self.graphs.clear()
            self.pool = None  # freed with them
            self.capacity = self.cache.capacity
        tensors = self._tensors(call)
        layout = tuple((n, tuple(t.shape[1:]), t.dtype) for n, t in sorted(tensors.items()))
        buffers = self._buffers(layout, tensors)
        pad = bucket - rows
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad]).unsqueeze(-1)
        self.io[:, :bucket].copy_(host, non_blocking=True)
        # Rows' state into the buffers, once per new state (admissions, compaction): from then on the
        # rows' state is the buffers' own rows, which the graph reads and advances in place.
        fresh = [(buffers[n][:rows], t) for n, t in tensors.items() if t.data_ptr() != buffers[n].data_ptr()]
        if fresh:
            torch._foreach_copy_([d for d, _ in fresh], [s for _, s in fresh])
            live = self._call_over(buffers, rows)
            call.block_gates.update(live.block_gates)
            call.prefix.update(live.prefix)
            if live.weights is not None:
                call.weights = live.weights  # the same values: its derived fields still hold
        key = (bucket, span, layout)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(bucket, span, buffers)
            except Exception:  # an op the graph cannot hold (a model's own code): this batch decodes eagerly
                logger.warning("capturing the decoding step failed; decoding eagerly", exc_info=True)
                self.broken = True
                return None
        return graph.replay()[:rows]

    def _step(self, bucket: int, span: int, buffers: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The step a graph holds: the forward over ``bucket`` rows, then the advanced state written back."""
        engine = self.engine
        ids, pos = self.io[0, :bucket], self.io[1, :bucket]
        call = self._call_over(buffers, bucket) if engine.mixture is not None and buffers else None
        inputs = dict(call.prefix) if call is not None else {}

        def step() -> torch.Tensor:
            using = nullcontext() if call is None else engine.mixture.routing.using(call)
            with using:
                if call is not None:
                    call.prepared.clear()  # rank gates: computed from the gate buffers inside the graph
                out = self.batch._forward(ids, pos, 0, span)
            if inputs:  # a token router's running sums: advanced in place, then read from there again
                for key, (total, count) in inputs.items():
                    total.copy_(call.prefix[key][0])
                    count.copy_(call.prefix[key][1])
                call.prefix.update(inputs)
            return out.logits[:, -1]

        return step

    def _capture(self, bucket: int, span: int, buffers: dict[str, torch.Tensor]):
        step = self._step(bucket, span, buffers)
        if not self.cuda:
            return _Emulated(step)
        # Warm up outside the capture (lazy initialisation must not be recorded) without touching the
        # rows: every row writes its keys at the bucket's last position, past anything it reads
        # (a row writes its next position before it attends to it), and the state is restored.
        saved = [t.clone() for t in buffers.values()]
        positions = self.io[1, :bucket].clone()
        self.io[1, :bucket].fill_(span - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        self.io[1, :bucket].copy_(positions)
        if saved:
            torch._foreach_copy_(list(buffers.values()), saved)
        graph = _Captured(step, self.pool)
        self.pool = graph.pool
        return graph
