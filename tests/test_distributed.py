"""Distributed ZO on real gloo process groups (CPU, one thread per rank): identity, wire size, faults, shards.

Each scenario runs this file as a script in W fresh processes (``python test_distributed.py
worker ...`` with RANK/WORLD_SIZE/MASTER_* set, as torchrun would), so every rank and the
single-process reference run in the same conditions (one thread, same model build, same
batches). Rank 0 writes its results; every rank writes its weights.

What "the same" means, per strategy (see :mod:`zo_fx.optim.distributed`):

* ``directions``: bit-identical to the single-process run (the per-example losses of a
  group do not depend on the other groups of its pass here, and the means are formed from
  the same ``[G, B]`` table as on one process).
* ``data``: ranks bit-identical to each other; against the single process the group means
  agree within rounding, not bit for bit: the B losses of a group are summed per shard and
  then across shards (another float64 order), and each shard's forward runs its GEMMs on
  fewer rows, which this CPU's BLAS may round differently in the model's dtype (float32:
  per-example losses differ by an ulp, measured 2e-7). The tests therefore train a float64
  model, where both effects stay at float64 rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
METHODS = {
    "fzoo": dict(eps=1e-3, n_directions=4, weight_decay=0.01, seed=3),
    "mezo": dict(eps=1e-3, weight_decay=0.01, seed=3),
    "adamezo": dict(eps=1e-3, horizon=2, weight_decay=0.01, seed=3),
}
STEPS = 4
BATCH = 7  # not a multiple of 2 or 3: shards of unequal size


# ---- the tiny model and its data (built identically in every process) ----------------------------------


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(11, width)
        self.lin = torch.nn.Linear(width, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, 5)

    def forward(self, ids):
        return self.out(torch.tanh(self.norm(self.lin(self.emb(ids).mean(1)))))


def per_example_ce(outputs, batch):
    labels = batch["labels"].repeat(outputs.shape[0] // batch["labels"].shape[0])
    return torch.nn.functional.cross_entropy(outputs, labels, reduction="none")


def tiny_batch(step: int, size: int = BATCH) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {"ids": torch.randint(0, 11, (size, 4), generator=g), "labels": torch.randint(0, 5, (size,), generator=g)}


def build(width=8, hidden=16, dtype=torch.float64):
    import zo_fx

    torch.manual_seed(0)
    model = Tiny(width, hidden).to(dtype)
    zm = zo_fx.zo_compile(model, tiny_batch(0), loss=per_example_ce, loss_keys=["labels"])
    return model, zm


# ---- the worker ---------------------------------------------------------------------------------------------


class WireCounter:
    """Counts the bytes this rank hands to every torch.distributed collective (wraps them in place)."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter", "gather",
             "scatter", "send", "isend", "all_to_all", "all_gather_object", "broadcast_object_list")

    def __init__(self):
        import torch.distributed as dist

        self.bytes = 0
        self.calls = 0
        for name in self.NAMES:
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):  # the tensor this rank sends (output lists are not tensors)
                    self.bytes += a.numel() * a.element_size()
            self.calls += 1
            return original(*args, **kwargs)

        return counted


def worker(scenario: str, out: str, *args) -> None:
    import torch.distributed as dist

    import zo_fx
    from zo_fx.optim.distributed import init_from_env

    torch.set_num_threads(1)
    out = Path(out)
    distributed = init_from_env(timeout=float(os.environ.get("ZO_TEST_TIMEOUT", "60")))
    rank = dist.get_rank() if distributed else 0
    counter = WireCounter() if distributed else None

    if scenario == "train":  # args: strategy, then methods
        strategy, methods = args[0], args[1:]
        model, zm = build()
        base = {n: p.detach().clone() for n, p in model.state_dict().items()}
        result = {}
        for method in methods:
            model.load_state_dict(base)
            opt = zo_fx.build_optimizer(method, zm, lr=0.05, strategy=strategy, **METHODS[method])
            infos = []
            for step in range(STEPS):
                infos.append(opt.step(tiny_batch(step)).losses)
            torch.save({n: p.detach().clone() for n, p in model.state_dict().items()}, out / f"{method}-{rank}.pt")
            if rank == 0:
                opt.trajectory.save(out / f"{method}-trajectory.json")
                result[method] = infos
        if rank == 0:
            (out / "result.json").write_text(json.dumps(result))
    elif scenario == "resume":  # args: strategy, phase (first: steps 0-1 and save; second: load, steps 2-3)
        strategy, phase = args
        model, zm = build()
        opt = zo_fx.build_optimizer("fzoo", zm, lr=0.05, strategy=strategy, **METHODS["fzoo"])
        if phase == "second":
            model.load_state_dict(torch.load(out / "resume-weights.pt"))
            opt.load_state_dict(json.loads((out / "resume-state.json").read_text()))
        for step in range(opt.step_count, opt.step_count + 2):
            opt.step(tiny_batch(step))
        if phase == "first" and rank == 0:  # rank 0 writes the checkpoint
            torch.save(model.state_dict(), out / "resume-weights.pt")
            (out / "resume-state.json").write_text(json.dumps(opt.state_dict()))
        if phase == "second":
            torch.save({n: p.detach().clone() for n, p in model.state_dict().items()}, out / f"resumed-{rank}.pt")
    elif scenario == "wire":  # bytes one step hands to the collectives: two model sizes, two group counts
        result = {}
        for width, hidden, more in ((8, 16, True), (64, 256, False)):
            model, zm = build(width, hidden)
            for strategy, n in [("directions", 4), ("data", 4)] + [("data", 8)] * more:
                opt = zo_fx.FZOO(zm, lr=0.01, eps=1e-3, n_directions=n, seed=1, strategy=strategy)
                before = counter.bytes
                opt.step(tiny_batch(1))
                result[f"{strategy}-{n}-{width}x{hidden}"] = counter.bytes - before
            result[f"params-{width}x{hidden}"] = sum(p.numel() for p in model.parameters())
        if rank == 0:
            (out / "result.json").write_text(json.dumps(result))
    elif scenario == "fault":  # args: how ("raise" or "exit"), failing rank, strategy
        how, bad, strategy = args[0], int(args[1]), args[2]
        model, zm = build()

        def loss(outputs, batch, _step=[0]):
            _step[0] += 1
            if rank == bad and _step[0] == 3:
                if how == "exit":
                    os._exit(7)
                if how == "hang":
                    time.sleep(3600)
                raise RuntimeError(f"injected failure on rank {rank}")
            return per_example_ce(outputs, batch)

        zm.loss_fn = loss
        # a hang is caught by the optimizer's own timeout (5 s), before the group's (ZO_TEST_TIMEOUT)
        opt = zo_fx.FZOO(zm, lr=0.01, eps=1e-3, n_directions=4, seed=1, strategy=strategy,
                         timeout=5 if how == "hang" else None)
        for step in range(5):
            opt.step(tiny_batch(step))
        print(f"rank {rank}: finished without noticing the failure", flush=True)
    elif scenario == "trainer":  # ZOTrainer under torchrun, unchanged: rank weights equal, rank 0 writes
        from model_zoo import causal_batch, tiny_llama
        from transformers import TrainingArguments

        class Examples(torch.utils.data.Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                return {k: v[0] for k, v in causal_batch(1, 7, seed=i, pad_tail=False).items()}

        model = tiny_llama(torch.float32)
        args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=1e-3, save_strategy="steps", save_steps=3, report_to=[],
                                 use_cpu=True, seed=5, disable_tqdm=True, logging_steps=1)
        trainer = zo_fx.ZOTrainer(model=model, args=args, train_dataset=Examples(), zo_method="fzoo",
                                  zo_kwargs={"n_directions": 3})
        trainer.train()
        assert trainer.zo_optimizer.distributed.strategy == "data"
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out / f"trainer-{rank}.pt")
        if rank == 0:
            trainer.zo_optimizer.trajectory.save(out / "trainer-trajectory.json")
    elif scenario == "fsdp":  # FSDP2 is refused with a clear error, never trained silently wrong
        from torch.distributed.fsdp import fully_shard

        model, _ = build()
        fully_shard(model)
        model(tiny_batch(0)["ids"])  # after an eager forward the root holds full tensors: export succeeds
        zm = zo_fx.zo_compile(model, tiny_batch(0), loss=per_example_ce, loss_keys=["labels"])
        try:
            zo_fx.FZOO(zm, lr=0.01, n_directions=4)
        except ValueError as err:
            (out / f"fsdp-{rank}.txt").write_text(str(err))
    if distributed:
        if scenario != "fault":  # every rank reaches teardown together: a rank still busy (rank 0 writing
            dist.barrier()  # files) while another destroys the group has hung destroy_process_group
        dist.destroy_process_group()


# ---- the launcher ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, scenario: str, out: Path, *args, timeout: float = 240.0, test_timeout: float = 60.0,
           hung=()):
    """Start ``world`` ranks (or one plain process when world is 0) and wait; returns [(rc, output, seconds)].

    ``hung``: ranks expected to hang (killed once the others are done, or after ``timeout``).
    """
    # ZO_FX_COMPILE=0: the ranks generate directions eagerly. Concurrent inductor builds in several
    # processes on a loaded 2-core machine have produced a library that fails to load (undefined
    # symbol), even with a cache per rank; the compiled path's shard equality is tested in-process.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZO_TEST_TIMEOUT": str(test_timeout), "ZO_FX_COMPILE": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    procs, logs = [], []
    t0 = time.perf_counter()
    for rank in range(max(world, 1)):
        # a private inductor cache per rank: ranks compiling the same kernel at once into one shared cache
        # have loaded each other's half-written libraries (undefined symbol errors)
        rank_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(out / f"inductor-{rank}")}
        if world:
            rank_env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(port))
        logs.append(open(out / f"rank{rank}.log", "w+"))  # noqa: SIM115 - closed below
        procs.append(subprocess.Popen([sys.executable, str(HERE), "worker", scenario, str(out), *args],
                                      env=rank_env, stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    ended = [None] * len(procs)
    while any(e is None for e in ended) and time.perf_counter() - t0 < timeout:
        for rank, p in enumerate(procs):
            if ended[rank] is None and p.poll() is not None:
                ended[rank] = time.perf_counter() - t0
        if all(e is not None for r, e in enumerate(ended) if r not in hung):
            break
        time.sleep(0.1)
    results = []
    for rank, p in enumerate(procs):
        if ended[rank] is None:
            p.kill()
            p.wait()
            if rank not in hung:
                for q in procs:
                    q.kill()
                raise AssertionError(f"{scenario} {args}: rank {rank} hung past {timeout} s")
        logs[rank].seek(0)
        results.append((p.returncode, logs[rank].read(), ended[rank] or timeout))
        logs[rank].close()
    return results


def _ok(results):
    for rank, (rc, text, _) in enumerate(results):
        assert rc == 0, f"rank {rank} exited {rc}:\n{text[-3000:]}"


def _load(out: Path, method: str, rank: int) -> dict:
    return torch.load(out / f"{method}-{rank}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _ok(launch(0, "train", out, "directions", *METHODS))
    return out


@pytest.mark.parametrize("strategy, world", [("directions", 2), ("data", 3),  # the fast set covers 2 and 3
                                             pytest.param("directions", 3, marks=pytest.mark.slow),
                                             pytest.param("data", 2, marks=pytest.mark.slow)])
def test_ranks_match_each_other_and_the_single_process_run(reference, tmp_path, strategy, world):
    _ok(launch(world, "train", tmp_path, strategy, *METHODS))
    single = json.loads((reference / "result.json").read_text())
    multi = json.loads((tmp_path / "result.json").read_text())
    for method in METHODS:
        weights = [_load(tmp_path, method, r) for r in range(world)]
        for r in range(1, world):  # every rank applies the same update from the same numbers
            for name in weights[0]:
                assert torch.equal(weights[0][name], weights[r][name]), f"{method} rank {r} {name}"
        ref = _load(reference, method, 0)
        if strategy == "directions":  # the same [G, B] table, the same mean: bit for bit
            assert multi[method] == single[method], method
            for name in ref:
                assert torch.equal(weights[0][name], ref[name]), f"{method} {name} differs from one process"
        else:  # the same means up to float64 summation order
            for a, b in zip(multi[method], single[method]):
                assert a == pytest.approx(b, rel=1e-12, abs=1e-14), method
            for name in ref:
                torch.testing.assert_close(weights[0][name], ref[name], rtol=1e-9, atol=1e-12)
        # rank 0's trajectory replays on one process to rank 0's weights, bit for bit
        import zo_fx

        torch.manual_seed(0)
        fresh = Tiny().double()
        zo_fx.replay(fresh, zo_fx.Trajectory.load(tmp_path / f"{method}-trajectory.json"))
        for name, p in fresh.state_dict().items():
            assert torch.equal(p, weights[0][name]), f"{method} replay {name}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy, first, second", [("directions", 3, 3), ("data", 2, 3)])
def test_a_distributed_run_resumes_from_rank_0s_checkpoint(reference, tmp_path, strategy, first, second):
    """Directions: same world size, bit-identical to the uninterrupted single-process run; data: another world size,
    within float64 rounding of it."""
    _ok(launch(first, "resume", tmp_path, strategy, "first"))
    _ok(launch(second, "resume", tmp_path, strategy, "second"))
    ref = _load(reference, "fzoo", 0)
    weights = [torch.load(tmp_path / f"resumed-{r}.pt") for r in range(second)]
    for name in ref:
        assert all(torch.equal(weights[0][name], w[name]) for w in weights[1:]), name
        if strategy == "directions":
            assert torch.equal(weights[0][name], ref[name]), name
        else:
            torch.testing.assert_close(weights[0][name], ref[name], rtol=1e-9, atol=1e-12)


def test_bytes_per_step_depend_on_groups_not_on_model_size(tmp_path):
    world = 2
    _ok(launch(world, "wire", tmp_path, timeout=240))
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["params-64x256"] > 20 * r["params-8x16"]
    for strategy in ("directions", "data"):
        small, large = r[f"{strategy}-4-8x16"], r[f"{strategy}-4-64x256"]
        assert small == large, (strategy, small, large)
    # directions: a 3-number header, then this rank's padded share of the [G, B] losses, float64
    assert r["directions-4-8x16"] == 8 * (3 + 3 * BATCH)  # G = 5 groups on 2 ranks: shares of 3 and 2
    # data: [status, fingerprint, count, G sums], float64
    assert r["data-4-8x16"] == 8 * (3 + 5) and r["data-8-8x16"] == 8 * (3 + 9)


@pytest.mark.parametrize("how", ["raise", pytest.param("exit", marks=pytest.mark.slow),
                                 pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_rank_stops_the_others_with_its_name(tmp_path, how):
    """A rank that raises in its share, dies, or hangs: the others exit non-zero, naming rank 1, in time."""
    # the process group's timeout; a hang meets the optimizer's own (5 s) first, which raises the named error, but
    # the process exits only once gloo gives up the pending collective at the group's timeout
    timeout = 15 if how != "hang" else 25
    results = launch(3, "fault", tmp_path, how, "1", "directions", test_timeout=timeout,
                     hung=(1,) if how == "hang" else ())
    for rank, (rc, text, seconds) in enumerate(results):
        assert rc != 0, f"rank {rank} exited 0:\n{text[-2000:]}"
        assert "finished without noticing" not in text
        if rank != 1:
            assert "DistributedStepError" in text, text[-2000:]
            assert "rank(s) [1]" in text, text[-2000:]
            # start-up (imports, compiles) included; a hang would run to the launcher's 240 s
            assert seconds < 120, f"rank {rank} took {seconds:.0f} s to notice"
            if how == "hang":
                assert "timed out after 5 s" in text, text[-2000:]


def test_data_strategy_fault_and_bad_input(tmp_path):
    results = launch(2, "fault", tmp_path, "raise", "0", "data", test_timeout=15)
    assert results[0][0] != 0 and "injected failure on rank 0" in results[0][1]
    assert results[1][0] != 0 and "rank(s) [0]" in results[1][1], results[1][1][-2000:]


def test_fsdp2_models_are_refused_clearly(tmp_path):
    _ok(launch(2, "fsdp", tmp_path))
    for rank in range(2):
        assert "FSDP2" in (tmp_path / f"fsdp-{rank}.txt").read_text()


@pytest.mark.slow
def test_zo_trainer_runs_under_torchrun_unchanged(tmp_path):
    _ok(launch(2, "trainer", tmp_path, timeout=180))
    w0, w1 = torch.load(tmp_path / "trainer-0.pt"), torch.load(tmp_path / "trainer-1.pt")
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert (tmp_path / "hf" / "checkpoint-3" / "zo_optimizer.json").exists()
    sys.path.insert(0, str(HERE.parent))
    from model_zoo import tiny_llama

    import zo_fx

    replayed = zo_fx.replay(tiny_llama(torch.float32), zo_fx.Trajectory.load(tmp_path / "trainer-trajectory.json"))
    assert all(torch.equal(p, w0[n]) for n, p in replayed.named_parameters())


def test_bad_settings_are_refused():
    from zo_fx.optim.distributed import Distributed, share

    with pytest.raises(ValueError, match="unknown strategy"):
        Distributed.resolve(None, "pipeline")
    with pytest.raises(ValueError, match="not initialised"):
        Distributed.resolve(object(), "data")
    assert Distributed.resolve(None, "data") is None  # one process: the plain path
    sizes = [share(9, 4, r) for r in range(4)]
    assert sizes == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert [share(2, 3, r) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]


# ---- sharded parameters: the update of a flat element range ----------------------------------------------------


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sharded_update_equals_unsharded_bit_for_bit(kind, dtype):
    from zo_fx.kernels.update import adamezo_update_, fused_update_reference_

    total = 1001
    g = torch.Generator().manual_seed(5)
    p = torch.randn(total, generator=g).to(dtype)
    seeds, coefs = [3, 2**63 + 5, 77], [0.3, -1.2, 2.0]
    whole = fused_update_reference_(p.clone(), seeds, coefs, 9, kind, 0.1, 0.01, chunk=256)
    whole_ada = adamezo_update_(p.clone(), seeds, coefs, 9, kind, 0.1, (0.7, 0.9), 0.01, impl="torch")
    # cuts off Philox blocks (1, 129, 130, 999), on one (128, 256), and ranges inside one chunk
    for cuts in ([0, 500, 1001], [0, 1, 129, 130, 256, 999, 1001], [0, 128, 1001], [0, 334, 668, 1001]):
        sharded, sharded_ada = p.clone(), p.clone()
        for a, b in zip(cuts, cuts[1:]):
            shard = p[a:b].clone()
            fused_update_reference_(shard, seeds, coefs, 9, kind, 0.1, 0.01, chunk=256, start=a, total=total)
            sharded[a:b] = shard
            shard = p[a:b].clone()
            adamezo_update_(shard, seeds, coefs, 9, kind, 0.1, (0.7, 0.9), 0.01, impl="torch", start=a, total=total)
            sharded_ada[a:b] = shard
        assert torch.equal(sharded, whole), cuts
        assert torch.equal(sharded_ada, whole_ada), cuts


@pytest.mark.parametrize("method", ["fzoo", "adamezo"])
def test_a_trajectory_applied_to_shards_equals_the_whole_parameters(reference, method):
    """Rank shards of every parameter (3 ranks, ranges off the Philox blocks) updated by the run's records."""
    import zo_fx
    from zo_fx.optim.distributed import local_shards

    trajectory = zo_fx.Trajectory.load(reference / f"{method}-trajectory.json")
    torch.manual_seed(0)
    whole = Tiny().double()
    base = {n: p.detach().clone() for n, p in whole.named_parameters()}
    zo_fx.replay(whole, trajectory)
    for world in (2, 3, 7):
        for rank in range(world):
            tensors, shards = local_shards(base, rank, world)
            for i in range(len(trajectory)):
                trajectory.apply(tensors, i, impl="torch", shards=shards)
            for name, shard in tensors.items():
                start = shards[name][0]
                expected = dict(whole.named_parameters())[name].detach().reshape(-1)[start:start + shard.numel()]
                assert torch.equal(shard, expected), (method, world, rank, name)


def test_sharded_update_refuses_a_range_outside_the_parameter_and_triton():
    from zo_fx.kernels.update import fused_update_

    with pytest.raises(ValueError, match="not inside"):
        fused_update_(torch.zeros(10), [1], [1.0], 1, "rademacher", 0.1, start=5, total=12)
    with pytest.raises(ValueError, match="torch reference only"):
        fused_update_(torch.zeros(10), [1], [1.0], 1, "rademacher", 0.1, start=5, total=15, impl="triton")


@pytest.mark.slow
def test_sharded_update_on_the_compiled_path_equals_unsharded():
    """Chunks of 64K+ elements run the torch.compile'd update: a shard must take the same path."""
    from zo_fx.kernels.update import fused_update_

    total = 200_003
    for kind in ("rademacher", "gaussian"):
        p = torch.randn(total)
        whole = fused_update_(p.clone(), [5, 6], [0.5, -0.25], 4, kind, 0.01, 0.1, impl="torch")
        sharded = p.clone()
        for a, b in ((0, 70_001), (70_001, 70_100), (70_100, total)):
            shard = p[a:b].clone()
            fused_update_(shard, [5, 6], [0.5, -0.25], 4, kind, 0.01, 0.1, start=a, total=total)
            sharded[a:b] = shard
        assert torch.equal(sharded, whole), kind


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    sys.path.insert(0, str(HERE.parent))
    worker(*sys.argv[2:])
