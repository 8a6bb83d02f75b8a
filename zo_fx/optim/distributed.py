"""Many processes, one trajectory: direction-parallel and data-parallel ZO steps on ``torch.distributed``.

A ZO step's whole gradient information is the G group losses. Ranks that share the run
seed draw the same directions (seeds are a function of (run seed, step, index), never of
a rank's RNG), so they only need to exchange those losses; each then computes the same
coefficients from the same numbers and applies the same fused update. No weight ever
crosses the wire, and the ranks stay bit-identical.

Two strategies (:data:`STRATEGIES`):

* ``"directions"``: every rank gets the same batch and evaluates a contiguous share of the
  step's G groups (shares differ by at most one; FZOO's unperturbed group 0 belongs to one
  share only, so it is evaluated once). One all-gather of a 3-number header (status, batch
  fingerprint, batch size) and one of the per-example losses ``[G, B]`` give every rank the
  whole ``[G, B]`` table; the group means are then formed exactly as on one process, so the
  run is bit-identical to the single-process run whenever a group's per-example losses do
  not depend on which other groups share its forward pass (true for the tiny test models on
  this CPU; a BLAS whose rounding depends on the matrix height could break it, the tests
  check it).
* ``"data"``: every rank evaluates all G groups on its shard of the batch (contiguous,
  sizes differ by at most one) and all-gathers ``[status, fingerprint, count, sum_1..sum_G]``
  (float64 sums of its per-example losses). Every rank adds the G sums of all ranks in rank
  order and divides by the total count, so all ranks get the same means bit for bit; they
  equal the single-process means within float64 rounding only (the single process sums the
  B losses of a group in one reduction, here they are summed per shard and then across
  shards: another order). The coefficients can then differ from the single process's in the
  last float64 bits, which can move a float32 weight by one ulp.

Per step a rank sends ``O(G)`` numbers (data) or ``O(G * B / world)`` (directions: its share
of the per-example losses), independent of the model size.

Faults: the collectives fail after the process group's timeout (the one given to
``init_process_group``: set it, it is what makes a process with a hung peer exit). The
optimizer's own ``timeout`` raises the error sooner, but gloo cannot cancel the pending
collective, so the process still exits only once the group's timeout has passed. A rank
whose evaluation raises still takes part in the header exchange with status "failed", so the
other ranks stop at once with a :class:`DistributedStepError` naming it, and it re-raises
its own error. A rank that dies or hangs makes the collective fail (connection closed) or
time out; the others then raise a :class:`DistributedStepError` naming the ranks that did
not report, never hang.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zo_fx.streams.table import GroupTable

from .means import example_means, finite_columns

STRATEGIES = ("directions", "data")
OK, FAILED = 0.0, 1.0
#: seconds a slower rank gets to reach a failed exchange before the error names it as silent
GRACE_S = 10.0
#: fingerprints are kept below 2**48 so that float64 carries them exactly
_FINGERPRINT_BITS = 48


class DistributedStepError(RuntimeError):
    """Another rank failed, died, timed out, or was given a different batch: this rank stops too."""


def share(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are split in ``parts`` contiguous parts.

    The first ``n % parts`` parts get one item more, so sizes differ by at most one.
    """
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts} does not exist")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def batch_size_of(batch: dict) -> int:
    """The number of examples of a batch: the leading size of its first tensor with a batch dim."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("the batch holds no tensor with a batch dimension")


def shard_batch(batch: dict, start: int, stop: int) -> dict:
    """Examples ``[start, stop)`` of every per-example tensor of ``batch`` (other values as they are)."""
    size = batch_size_of(batch)
    return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
            for k, v in batch.items()}


def batch_fingerprint(batch: dict) -> int:
    """48 bits of BLAKE2b over the batch's keys, dtypes, shapes and tensor bytes (to catch ranks fed differently)."""
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(batch):
        v = batch[k]
        h.update(repr(k).encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous().cpu()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return int.from_bytes(h.digest(), "little") & (2**_FINGERPRINT_BITS - 1)


@dataclass
class Distributed:
    """How one optimizer talks to its peers: the group, this rank, the strategy and the timeout.

    Build it with :meth:`resolve`; ``None`` from there means single-process.

    Attributes:
        group: the process group (``None`` is the default group).
        rank, world: this process's rank in ``group`` and the group's size.
        strategy: ``"directions"`` or ``"data"``.
        timeout: the longest a step's collective may wait (None: the process group's timeout).
        shard_batch: for ``"data"``: True (default) when every rank is given the whole batch and takes
            its shard; False when each rank is already given its own examples (e.g. a DistributedSampler).
    """

    group: object
    rank: int
    world: int
    strategy: str
    timeout: timedelta | None = None
    shard_batch: bool = True

    @classmethod
    def resolve(cls, process_group=None, strategy: str = "directions", timeout=None,
                shard_batch: bool = True) -> Distributed | None:
        """The peers of this process, or None when it runs alone (no initialised default group, or one rank)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use 'directions' (each rank evaluates a share of the "
                             "direction groups on the whole batch) or 'data' (each rank evaluates every group on "
                             "its shard of the batch)")
        if timeout is not None and not isinstance(timeout, timedelta):
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
                raise ValueError(f"timeout must be a datetime.timedelta or positive seconds; got {timeout!r}")
            timeout = timedelta(seconds=float(timeout))
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised: call "
                                 "torch.distributed.init_process_group first (torchrun sets up its environment)")
            return None
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("this process is not a member of the given process group: pass a group it belongs to "
                             "(every rank of the run must build its optimizer with the same group)")
        if world == 1:
            return None
        return cls(process_group, rank, world, strategy, timeout, bool(shard_batch))

    # ---- collectives ------------------------------------------------------------------------------------
    def _gather(self, row: torch.Tensor, what: str, step: int, phase: int = 0) -> list[torch.Tensor]:
        """All-gather one float64 row per rank; a failed or timed-out collective names the silent ranks."""
        mark = 2 * step + phase
        self._mark(mark)
        out = [torch.empty_like(row) for _ in range(self.world)]
        try:
            work = dist.all_gather(out, row, group=self.group, async_op=self.timeout is not None)
            if self.timeout is not None:
                self._wait(work, step, what)
        except DistributedStepError:
            raise
        except Exception as err:  # noqa: BLE001 - any backend failure becomes one clear error
            missing = self._silent_ranks(mark)
            who = (f"rank(s) {missing} did not report within {GRACE_S:g} s (died, hung, or raised outside the "
                   "step)" if missing else "a peer failed or timed out")
            first = str(err).splitlines()[0] if str(err) else ""
            raise DistributedStepError(
                f"rank {self.rank}: step {step}: the exchange of {what} failed: {who} ({type(err).__name__}: "
                f"{first}). Every rank stops; resume from the last complete checkpoint"
            ) from err
        return out

    def _wait(self, work, step: int, what: str) -> None:
        """Wait for ``work`` at most ``self.timeout``: polled, because gloo's ``Work.wait(timeout)`` does not
        give up before the process group's own timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        pause = 1e-5
        while not work.is_completed():
            if time.monotonic() > deadline:
                missing = self._silent_ranks(self._last_mark)
                who = f"rank(s) {missing} did not report" if missing else "a peer did not report"
                raise DistributedStepError(
                    f"rank {self.rank}: step {step}: the exchange of {what} timed out after "
                    f"{self.timeout.total_seconds():g} s: {who} (hung or died). Every rank stops; resume from the "
                    "last complete checkpoint"
                )
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        work.wait()  # raises the collective's own error, if it failed

    # Progress marks: before each collective a rank writes how far it got into the group's key-value
    # store (a few bytes, not a collective). When a collective fails, the ranks whose mark is behind
    # this rank's are the ones that never reached it: those are named in the error.
    def _store(self):
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: the error cannot name the ranks
            return None

    def _key(self, rank: int) -> str:
        return f"zo_fx/progress/{dist.get_global_rank(self.group, rank) if self.group is not None else rank}"

    def _mark(self, mark: int) -> None:
        self._last_mark = mark
        store = self._store()
        if store is not None:
            try:
                store.set(self._key(self.rank), str(mark))
            except Exception:  # noqa: BLE001 - marks only improve an error message
                pass

    def _silent_ranks(self, mark: int) -> list[int] | None:
        """Ranks whose progress mark stays behind ``mark`` for :data:`GRACE_S` seconds, or None if all catch up
        or the store cannot tell.

        A peer's collective error reaches a rank as soon as one peer goes, while a healthy but slower rank may
        still be evaluating its share: it gets the grace period to reach the exchange before it is named.
        """
        store = self._store()
        if store is None:
            return None
        deadline = time.monotonic() + GRACE_S
        try:
            while True:
                behind = []
                for r in range(self.world):
                    key = self._key(r)
                    if r != self.rank and (not store.check([key]) or int(store.get(key)) < mark):
                        behind.append(r)
                if not behind or time.monotonic() > deadline:
                    return behind or None
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 - the store went with a dead rank
            return None

    def _check_headers(self, headers: list[torch.Tensor], step: int, same_batch: bool) -> None:
        failed = [r for r, h in enumerate(headers) if h[0].item() != OK]
        if failed:
            raise DistributedStepError(
                f"rank {self.rank}: step {step}: rank(s) {failed} failed while evaluating their share of the step; "
                "every rank stops (see the failed rank's own error). Resume from the last complete checkpoint"
            )
        if same_batch and len({h[1].item() for h in headers}) > 1:
            prints = {r: int(h[1].item()) for r, h in enumerate(headers)}
            raise DistributedStepError(
                f"rank {self.rank}: step {step}: the ranks were given different batches (fingerprints {prints}); "
                f"strategy {self.strategy!r} needs the same batch on every rank (seed the data order identically, "
                "no DistributedSampler), or use strategy='data' with shard_batch=False for per-rank data"
            )

    # ---- one step's group means -----------------------------------------------------------------------
    def group_means(self, zm, batch: dict, table: GroupTable, step: int) -> tuple[list[float], list[int]]:
        """The G group mean losses of ``table`` on ``batch``, identical on every rank, and the examples
        left out of them (non-finite in some group; see :mod:`zo_fx.optim.means`).

        ``"directions"`` names the dropped examples by batch index on every rank; ``"data"`` names those
        of this rank's shard only (by index in the batch it was given), the means use every rank's."""
        if self.strategy == "directions":
            return self._directions(zm, batch, table, step)
        return self._data(zm, batch, table, step)

    def _directions(self, zm, batch, table: GroupTable, step: int) -> tuple[list[float], list[int]]:
        a, b = share(table.groups, self.world, self.rank)
        shares = [share(table.groups, self.world, r) for r in range(self.world)]
        size, fingerprint, error, local = 0, 0, None, None
        try:
            size, fingerprint = batch_size_of(batch), batch_fingerprint(batch)
            if b > a:
                sub = GroupTable(table.seeds[a:b], table.coefs[a:b], table.eps, table.kind)
                local = zm.group_losses(batch, sub).detach().to("cpu", torch.float64)
        except Exception as err:  # noqa: BLE001 - reported to the peers, then re-raised
            error = err
        header = torch.tensor([FAILED if error else OK, float(fingerprint), float(size)], dtype=torch.float64)
        headers = self._gather(header, "the step header", step)
        if error is not None:
            raise error
        self._check_headers(headers, step, same_batch=True)
        widest = max(s - r for r, s in shares)
        row = torch.zeros(widest * size, dtype=torch.float64)
        if local is not None:
            row[: local.numel()] = local.reshape(-1)
        rows = self._gather(row, "the group losses", step, phase=1)
        losses = torch.cat([rows[r][: (s - f) * size].view(s - f, size) for r, (f, s) in enumerate(shares)])
        return example_means(losses)  # as the single process

    def _data(self, zm, batch, table: GroupTable, step: int) -> tuple[list[float], list[int]]:
        size = batch_size_of(batch)
        if self.shard_batch:
            if size < self.world:
                raise ValueError(f"strategy 'data' splits the batch over {self.world} ranks but it holds {size} "
                                 f"example(s): use a batch of at least {self.world} examples, or strategy "
                                 "'directions'")
            a, b = share(size, self.world, self.rank)
            local_batch = shard_batch(batch, a, b)
            fingerprint = batch_fingerprint(batch)
        else:
            local_batch, fingerprint, a = batch, 0, 0
        error, sums, count, dropped = None, torch.zeros(table.groups, dtype=torch.float64), 0, []
        try:
            losses = zm.group_losses(local_batch, table).detach().to("cpu", torch.float64)
            good = finite_columns(losses)
            dropped = [a + int(i) for i in (~good).nonzero().flatten().tolist()]
            sums, count = losses[:, good].sum(1), int(good.sum())
        except Exception as err:  # noqa: BLE001 - reported to the peers, then re-raised
            error = err
        head = torch.tensor([FAILED if error else OK, float(fingerprint), float(count)], dtype=torch.float64)
        rows = self._gather(torch.cat([head, sums]), "the group loss sums", step)
        if error is not None:
            raise error
        self._check_headers(rows, step, same_batch=self.shard_batch)
        total, n = rows[0][3:].clone(), rows[0][2].item()
        for r in rows[1:]:  # rank order on every rank: the same float64 sums everywhere
            total = total + r[3:]
            n += r[2].item()
        if n == 0:  # no example finite in every group, on any rank: the step is skipped
            return [float("nan")] * table.groups, dropped
        return [float(v) for v in (total / n).tolist()], dropped


def local_shards(params: dict[str, torch.Tensor], rank: int, world: int
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """This rank's flat shard of every parameter: (name -> copy of its elements, name -> (start, total)).

    Each parameter is cut into ``world`` contiguous element ranges (sizes differ by at most one,
    :func:`share`); pass both dicts to :meth:`Trajectory.apply` (``shards=``) to update the shards
    exactly as the whole parameters would be. A rank whose range of a parameter is empty gets no
    entry for it in the first dict.
    """
    tensors, shards = {}, {}
    for name, p in params.items():
        start, stop = share(p.numel(), world, rank)
        shards[name] = (start, p.numel())
        if stop > start:
            tensors[name] = p.detach().reshape(-1)[start:stop].clone()
    return tensors, shards


def is_main_process() -> bool:
    """True on rank 0 of the default group and in a process outside any group: the one that prints and writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(timeout: float = 600.0, backend: str | None = None) -> bool:
    """Initialise the default group from torchrun's environment (RANK, WORLD_SIZE, ...) if it is set.

    Returns True when this process is now part of a group. ``backend`` defaults to nccl when CUDA
    is available, else gloo; ``timeout`` (seconds) bounds every collective.
    """
    import os

    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return True


__all__ = [
    "STRATEGIES", "Distributed", "DistributedStepError", "batch_fingerprint", "batch_size_of", "init_from_env",
    "is_main_process", "local_shards", "shard_batch", "share",
]
