"""Continuous batching: a request joins the running batch at the next decoding step and leaves it
the step it finishes, as vLLM, TGI and LoRAX schedule, over a KV cache with one slot per request.

    scheduler = Scheduler(Engine.from_artifact("out/quickstart/artifact"), max_running=32)
    scheduler.submit(GenerationRequest(engine.encode("reverse hello=")), deliver)  # any thread
    scheduler.start()  # a thread steps while there is work; or call step() yourself

Each :meth:`Scheduler.step`: rows whose client went away leave; every running row decodes one
token; finished rows leave and free their slots; waiting requests take free slots within the
step's token budget, are prefilled and emit their first token. ``deliver(Delta)`` is called from
the stepping thread with each request's new output as soon as it is decoded.

Rows keep their own routing state (:meth:`loramix.routing.CallState.concat`): fixed gates
(explicit weights, a pinned expert, a sequence router's route), MoLE's block gates, a token
router's running context. Rows with fixed gates and rows a block/token router gates inside the
forward decode as two batches (one forward each per step), exactly as :meth:`Engine.stream` groups
them, so a greedy row gives :meth:`MixtureModel.generate`'s tokens whatever else shares the step.

Prompts are prefilled whole, never chunked: MoLE's gates and MoDULA's prompt context pool over
the whole prompt before the first token. A prompt longer than the token budget is admitted alone.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from loramix.decode_graphs import StepGraphs
from loramix.kv_slots import SlotCache, compaction, slot_mask
from loramix.routing import CallState
from loramix.serving import Completion, Delta, Engine, GenerationRequest, _generator, _Row, _sample

logger = logging.getLogger(__name__)

Deliver = Callable[[Delta], None]
ADMIT_EVERY = 4  # steps a waiting request may wait for a busy engine to gather free slots
# ... and never more than 1/GATHER_SHARE of the tokens it asks for: a short completion is admitted at once.
GATHER_SHARE = 16


@dataclass
class _Live:
    """One running request: its output state, sampler and where its cache row stands."""

    request: GenerationRequest
    deliver: Deliver
    row: _Row
    gen: torch.Generator
    length: int  # tokens in its cache
    token: int = 0  # last sampled token, fed at the next step


class _Batch:
    """Running rows of one routing mode: their cache slots and, on a mixture, their routing state."""

    def __init__(self, engine: Engine, slots: int, cuda_graphs: bool = True):
        self.engine = engine
        self.live: list[_Live] = []
        p = next(engine.lm.parameters())
        self.cache = SlotCache(engine.lm.config, slots, p.dtype, p.device)
        self.attn = getattr(engine.lm.config, "_attn_implementation", None) or "sdpa"
        self.call: CallState | None = None
        self.graphs = StepGraphs.for_batch(self, cuda_graphs)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, start: int, length: int, keep=None):
        self.cache.bind(start, pos, length)
        kwargs = {
            "input_ids": ids,
            "attention_mask": slot_mask(pos, length, self.attn, next(self.engine.lm.parameters()).dtype),
            "position_ids": pos,
            "use_cache": True,
            self.engine._cache_kw: self.cache,
        }
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        return self.engine.lm(**kwargs)

    def prefill(self, new: list[tuple[GenerationRequest, Deliver]], weights, routes) -> None:
        """Write the prompts of ``new`` into the next free slots (one right-padded forward) and emit
        their first tokens; ``weights [b, E]`` fixed gates or None (routed in the forward)."""
        engine, device = self.engine, self.engine.device
        lengths = [len(r.prompt_ids) for r, _ in new]
        width, b, start = max(lengths), len(new), len(self.live)
        ids = torch.full((b, width), engine.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, (r, _) in enumerate(new):
            ids[i, : lengths[i]] = torch.tensor(list(r.prompt_ids))
            mask[i, : lengths[i]] = 1
        ids, mask = ids.to(device), mask.to(device)
        # Padding positions write past their row's end: overwritten by its own tokens before any read.
        pos = torch.arange(width, device=device).expand(b, width)
        last = torch.tensor(lengths, device=device) - 1
        keep = torch.unique(last)  # only the logits of each row's last prompt token
        mixture = engine.mixture
        record = mixture is not None and routes is None
        routing = nullcontext() if mixture is None else mixture.decoding(ids, mask, weights, record_route=record)
        with routing as call:
            out = self._forward(ids, pos, start, width, keep)
            if record:
                routes = mixture.take_route(mask).tolist()
        if call is not None:
            # The rows' decoding state (without prompt masks), after those already running.
            self.call = CallState.concat([call] if self.call is None else [self.call, call])
        logits = out.logits[torch.arange(b, device=device), torch.searchsorted(keep, last)]
        lives = [
            _Live(r, deliver, _Row(r, engine.tokenizer, route), _generator(r.params.seed), n)
            for (r, deliver), route, n in zip(new, routes or [None] * b, lengths)
        ]
        self.live += lives
        self._emit(lives, logits)

    def decode(self, rows: int) -> None:
        """One token for the first ``rows`` running rows (those admitted before this step)."""
        lives = self.live[:rows]
        tokens, positions = [x.token for x in lives], [x.length for x in lives]
        length = max(positions) + 1
        logits = None if self.graphs is None else self.graphs.decode(tokens, positions, length)
        if logits is None:
            device = self.engine.device
            ids = torch.tensor(tokens, device=device)[:, None]
            pos = torch.tensor(positions, device=device)[:, None]
            using = nullcontext() if self.call is None else self.engine.mixture.routing.using(self.call)
            with using:
                logits = self._forward(ids, pos, 0, length).logits[:, -1]
        for x in lives:
            x.length += 1
        self._emit(lives, logits)

    def _emit(self, lives: list[_Live], logits: torch.Tensor) -> None:
        tokens = _sample(logits.float(), [x.request for x in lives], [x.gen for x in lives])
        for x, token in zip(lives, tokens.tolist()):
            x.token = token
            delta = x.row.push(token)
            if delta is not None:
                x.deliver(delta)

    def fail(self, rows: Sequence[int], error: str) -> None:
        """Rows ``rows`` end with an error Delta (a forward raised)."""
        for i in rows:
            x = self.live[i]
            if not x.row.done:
                x.row.done = True
                x.deliver(Delta("", [], "error", error=error))

    def sweep(self) -> int:
        """Drop finished and cancelled rows, moving the last rows into their slots (cache, routing
        state and rows alike); how many left."""
        for x in self.live:
            if x.request.cancel is not None and x.request.cancel.is_set():
                x.row.done = True
        keep = compaction([i for i, x in enumerate(self.live) if not x.row.done])
        gone = len(self.live) - len(keep)
        if gone:
            if keep:
                self.cache.keep(keep)
                if self.call is not None:
                    self.call = self.call.rows(torch.tensor(keep, device=self.engine.device))
            else:
                self.call = None
            self.live = [self.live[i] for i in keep]
        return gone


class Scheduler:
    """Continuous batching over one :class:`~loramix.serving.Engine` (see the module docstring).

    Args:
        engine: the model, tokenizer and request checks.
        max_running: requests decoding at once (KV cache slots); more wait in arrival order.
        max_batched_tokens: tokens one step may run: one per running row plus the prompts it admits.
        cuda_graphs: on a CUDA device, decode through CUDA graphs (:mod:`loramix.decode_graphs`).
    """

    def __init__(
        self, engine: Engine, *, max_running: int = 32, max_batched_tokens: int = 2048, cuda_graphs: bool = True
    ):
        if max_running < 1 or max_batched_tokens < 1:
            raise ValueError("`max_running_requests` and `max_batched_tokens` must be >= 1.")
        self.engine = engine
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.cuda_graphs = cuda_graphs
        self.batches: dict[str, _Batch] = {}
        self.waiting: deque[tuple[GenerationRequest | Exception, Deliver, int]] = deque()  # + the step it came
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._started = self._closing = False
        self.steps = self.admitted = self.finished = 0
        self.admit_batch = max(1, max_running // 8)

    # ------------------------------------------------------------------------------ submitting
    def submit(self, request: GenerationRequest | Exception, deliver: Deliver) -> None:
        """Queue ``request`` (or the error that replaced it: it gets an error Delta); thread-safe.
        A scheduler closed and then asked again (a straggler of a dropped version) serves again."""
        with self._work:
            self.waiting.append((request, deliver, self.steps))
            self._work.notify()
            if self._closing:
                self._closing = False
                if self._started and self._thread is None:
                    self._spawn()

    @property
    def running(self) -> int:
        return sum(len(b.live) for b in self.batches.values())

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def complete(self, requests: Sequence[GenerationRequest | Exception]) -> list[Completion]:
        """Decode ``requests`` to the end on this thread (tests, benchmarks, offline use)."""
        parts: list[list[Delta]] = [[] for _ in requests]
        for r, ds in zip(requests, parts):
            self.submit(r, ds.append)
        while not self.idle():
            self.step()
        return [Completion.of(r, ds) for r, ds in zip(requests, parts)]

    # ------------------------------------------------------------------------------ stepping
    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: sweep, decode every running row, sweep, admit. False when there was nothing to do."""
        if self.idle():
            return False
        self.steps += 1
        decoding = 0
        for batch in self.batches.values():
            self.finished += batch.sweep()
            rows = len(batch.live)
            if rows:
                decoding += rows
                self._guarded(batch, range(rows), batch.decode, rows)
            self.finished += batch.sweep()
        self._admit(self.max_batched_tokens - decoding)
        return True

    def _admit(self, budget: int) -> None:
        free = self.max_running - self.running
        taken: list[tuple[GenerationRequest, Deliver]] = []
        with self._work:
            # Each admission costs a prefill forward (and a routing one): on a busy engine, gather a
            # few free slots first rather than pay them for every row that leaves, unless a request
            # that would be admitted has waited its share (:meth:`_patience`); at once while the
            # engine has room to spare.
            if self.running and free < self.admit_batch and not self._due(free):
                return
            while self.waiting and free > 0:
                request, deliver, _ = self.waiting[0]
                error = self._check(request)
                if error is not None:
                    self.waiting.popleft()
                    deliver(Delta("", [], "error", error=error))
                    continue
                n = len(request.prompt_ids)
                if taken and n > budget:  # a prompt over the whole budget still goes alone
                    break
                self.waiting.popleft()
                taken.append((request, deliver))
                budget, free = budget - n, free - 1
        if not taken:
            return
        self.admitted += len(taken)
        try:
            groups = list(self.engine._groups([r for r, _ in taken]))
        except Exception as err:  # the router failed on these prompts: they end, the running rows go on
            logger.exception("routing admitted requests failed")
            for _, deliver in taken:
                deliver(Delta("", [], "error", error=f"routing failed: {type(err).__name__}: {err}"))
            return
        for index, weights, routes in groups:
            # Fixed gates (explicit, pinned, a sequence router's) decode together; rows a block/token
            # router gates inside the forward apart, as Engine.stream groups them.
            mode = "plain" if self.engine.mixture is None else "routed" if weights is None else "fixed"
            rows = [taken[i] for i in index]
            batch = self.batches.get(mode)
            if batch is None:
                batch = self.batches[mode] = _Batch(self.engine, self.max_running, self.cuda_graphs)
            start = len(batch.live)
            ok = self._guarded(batch, None, batch.prefill, rows, weights, routes, new=[d for _, d in rows])
            if ok:
                self.finished += batch.sweep()
            elif len(batch.live) > start:  # its rows were added before the failure: drop them
                batch.live = batch.live[:start]

    def _due(self, free: int) -> bool:
        """One of the next ``free`` waiting requests has waited as long as it should for a gathering."""
        return any(self.steps - came >= self._patience(r) for r, _, came in itertools.islice(self.waiting, free))

    @staticmethod
    def _patience(request) -> int:
        """Steps ``request`` may wait for free slots to gather: ADMIT_EVERY at most, and no more than
        1/GATHER_SHARE of its ``max_tokens`` (a wait of 4 steps is 6% of a 64-token answer's time
        but half an 8-token one's). Errors go at once."""
        if isinstance(request, Exception):
            return 0
        return min(ADMIT_EVERY, request.params.max_tokens // GATHER_SHARE)

    def _check(self, request) -> str | None:
        try:
            if isinstance(request, Exception):
                raise request
            self.engine.check(request)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    def _guarded(self, batch: _Batch, rows, run, *args, new=None) -> bool:
        """Run a forward; if it raises, its rows (running ``rows`` or the ``new`` ones) end with an
        error Delta and the rest of the engine carries on."""
        try:
            run(*args)
            return True
        except Exception as err:  # a failing forward must not take the other batches down
            logger.exception("a decoding step failed")
            message = f"decoding failed: {type(err).__name__}: {err}"
            if new is not None:
                for deliver in new:
                    deliver(Delta("", [], "error", error=message))
            else:
                batch.fail(rows, message)
                self.finished += batch.sweep()
            return False

    # ------------------------------------------------------------------------------ thread
    def start(self) -> Scheduler:
        """Step on a daemon thread while there is work (sleeping when there is none)."""
        with self._work:
            self._started = True
            if self._thread is None:
                self._spawn()
        return self

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramix-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread once the requests it holds are finished."""
        with self._work:
            self._closing = True
            self._work.notify()

    def _loop(self) -> None:
        while True:
            with self._work:
                while self.idle() and not self._closing:
                    self._work.wait()
                if self._closing and self.idle():
                    self._thread = None  # under the lock: a later submit starts a new one
                    return
            try:
                self.step()
            except Exception as err:  # never leave a client waiting on a dead thread
                logger.exception("a scheduler step failed")
                self.abort(f"decoding failed: {type(err).__name__}: {err}")

    def abort(self, error: str) -> None:
        """End every running and waiting request with an error Delta (the engine state is reset)."""
        with self._work:
            waiting, self.waiting = list(self.waiting), deque()
        for batch in self.batches.values():
            batch.fail(range(len(batch.live)), error)
        self.batches = {}
        for _, deliver, _ in waiting:
            deliver(Delta("", [], "error", error=error))

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "admitted": self.admitted,
            "finished": self.finished,
            "running": self.running,
            "waiting": len(self.waiting),
        }
