"""One fine-tuning run end to end: set up, evaluate zero-shot (or resume), train, evaluate, write outputs.

:class:`FinetuneJob` sequences the other modules of :mod:`zo_fx.finetune`; :func:`run` is
what ``zo-fx finetune`` calls. All setup that can fail on bad input happens in the
constructor, before anything is written or an earlier run is replaced.

Under ``torchrun`` (``torchrun --nproc_per_node=K -m zo_fx finetune ...``) every rank runs the
same job on the same batches, and the optimizer splits each step's direction groups over the
ranks (``strategy="directions"``, :mod:`zo_fx.optim.distributed`); only rank 0 takes the run
lock, prints, and writes checkpoints and outputs, the others stay silent.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from zo_fx.files import WriteError, atomic_path, atomic_write_json, replace_dir, writing
from zo_fx.finetune.config import DEFAULT_EVALS, DTYPES, FinetuneConfig, FinetuneError
from zo_fx.finetune.evaluation import describe, evaluate
from zo_fx.finetune.loss import build_loss, check_label_words, fit_task
from zo_fx.finetune.model import apply_peft, load_model_and_tokenizer, load_tokenizer, preflight
from zo_fx.finetune.optimizer import build_optimizer
from zo_fx.finetune.plots import plot_curves, summary_table
from zo_fx.finetune.resume import (
    check_free_space,
    output_dir_of,
    prepare_output_dir,
    restore_checkpoint,
    write_checkpoint,
)
from zo_fx.finetune.signals import RunStopped, StopSignal
from zo_fx.finetune.task import build_task
from zo_fx.locks import RunLock, RunLockedError
from zo_fx.optim.checkpoint import latest_checkpoint
from zo_fx.optim.distributed import init_from_env, is_main_process

#: a run stops after this many steps in a row skipped for a non-finite loss or weight
MAX_NONFINITE_STEPS = 5


class _NoLock(contextlib.nullcontext):
    """What a rank other than 0 holds instead of the run lock (rank 0 holds the real one)."""

    def release(self) -> None:
        pass


class FinetuneJob:
    """One run of :func:`run`, in three parts: ``start`` (zero-shot or resume), ``train``, ``finish``.

    The constructor does all the setup that can fail on bad input (task, model, tokenizer, label
    words, compile) before anything is written or an earlier run is replaced.
    """

    def __init__(self, cfg: FinetuneConfig, stop: StopSignal | None = None):
        self.wall0 = time.perf_counter()
        self.cfg = cfg
        self.stop = stop or StopSignal()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.out = output_dir_of(cfg)
        self.main = is_main_process()  # rank 0 (or the only process): the one that writes
        try:  # before anything is read from or written to the folder
            self.lock = RunLock.acquire(self.out) if self.main else _NoLock()
        except RunLockedError as err:
            raise FinetuneError(str(err)) from None
        try:
            self._setup(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: FinetuneConfig) -> None:
        stale = prepare_output_dir(cfg, self.out) if self.main else []
        self.task = self.build_task(cfg)
        print(self.task.summary(), flush=True)
        preflight(cfg.model, cfg.max_length)  # a folder's files, its tokenizer, its position limit
        self.check_before_load(cfg)
        print(f"loading {cfg.model} ...", flush=True)
        model, self.tokenizer = load_model_and_tokenizer(cfg.model, DTYPES[cfg.dtype])
        self.model = apply_peft(model, cfg.peft, cfg.seed, cfg.peft_fields, cfg.total_steps)
        self.task = self.fit_task(self.task)
        self.cursor = self.task.cursor(cfg.batch_size, seed=cfg.seed)
        self.optimizer = self.build_optimizer(cfg)
        self.trainable_bytes = sum(p.numel() * p.element_size() for p in self.optimizer.params.values())
        if self.main:
            check_free_space(self.out, self.trainable_bytes)
        for path in stale:  # --overwrite, now that the new run is set up
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.total = cfg.total_steps
        self.eval_every = cfg.eval_every or max(1, math.ceil(self.total / DEFAULT_EVALS))
        self.checkpoint_every = cfg.checkpoint_every or self.eval_every
        trainable = sum(p.numel() for p in self.optimizer.params.values())
        parameters = sum(p.numel() for p in self.model.parameters())
        print(f"{cfg.method} on {trainable:,} of {parameters:,} parameters (peft={cfg.peft}), "
              f"lr={cfg.learning_rate:g}, {self.total} steps x {cfg.per_step_forward_passes} "
              f"forward passes of {cfg.batch_size} examples -> {self.out}", flush=True)

    # ---- what a kind of task decides (a reward task overrides these: zo_fx.finetune.reward) ----------------
    def build_task(self, cfg: FinetuneConfig):
        return build_task(cfg)

    def fit_task(self, task):
        """The task as the loaded model reads it (a mask token for a masked LM)."""
        return fit_task(task, self.tokenizer, self.model)

    def check_before_load(self, cfg: FinetuneConfig) -> None:
        early = load_tokenizer(cfg.model)
        if early is not None:  # label words by token id, before the model load
            check_label_words(self.task, early)

    def build_optimizer(self, cfg: FinetuneConfig):
        self.loss = build_loss(self.task, self.tokenizer, self.model, cfg.peft)
        example = self.encode(self.task.train[:cfg.batch_size])
        return build_optimizer(cfg, self.model, self.loss, example, self.out)

    def step(self, batch: dict):
        return self.optimizer.step(batch)

    def score(self, split: str, desc: str) -> dict:
        """The evaluation numbers of ``split`` (accuracy and loss here; mean reward for a reward task)."""
        return evaluate(self.model, self.task, self.tokenizer, self.loss, split, self.cfg.max_length, desc=desc)

    def task_record(self) -> dict:
        task = self.task
        return {"name": task.name, "description": task.description, "label_words": task.label_words,
                "template": task.template, "demonstrations": task.demonstrations,
                "masked_lm": task.mask_token_id is not None, "metric": "accuracy", "metric_keys": ["accuracy", "loss"],
                "sizes": {s: len(getattr(task, s)) for s in ("train", "validation", "test")}}

    def encode(self, examples) -> dict:
        return self.task.encode(self.tokenizer, examples, self.cfg.max_length)

    def evaluation(self, split: str, phase: str) -> dict:
        opt = self.optimizer
        if phase == "train":
            desc = f"{split} at step {opt.step_count}"
        else:
            desc = f"{phase.replace('_', '-')} {split}"
        result = self.score(split, desc)
        return {"step": opt.step_count, "forward_passes": opt.forward_passes, "phase": phase, **result}

    def start(self) -> dict:
        """The run's state: restored from the newest checkpoint, or fresh with zero-shot evaluations."""
        if self.cfg.resume:
            state = restore_checkpoint(self.out, self.cfg, self.model, self.optimizer, self.cursor,
                                       self.task.fingerprint())
            done = self.optimizer.step_count
            if done > self.total:
                raise FinetuneError(f"--resume: the run in {self.out} has already done {done} steps, more than the "
                                    f"{self.total} asked for; pass --steps {done} or more (the total to reach), or "
                                    "start a new --output-dir")
            print(f"resumed at step {done} from {self.out}", flush=True)
        else:
            zero_shot = [self.evaluation(split, "zero_shot") for split in ("validation", "test")]
            state = {"history": [], "evals": zero_shot}
        state["settings"] = self.cfg.resolved()
        state["data_sha256"] = self.task.fingerprint()
        return state

    def train(self, state: dict) -> None:
        """Step until ``total``; validate and checkpoint on schedule; report skipped steps as they happen.

        Stops early, with the weights finite, after :data:`MAX_NONFINITE_STEPS` non-finite steps in a row;
        on SIGTERM, after the step under way and a checkpoint (:mod:`zo_fx.finetune.signals`)."""
        opt, history = self.optimizer, state["history"]
        if opt.step_count < self.total:
            self.compile_phase()
        bar = tqdm(total=self.total, initial=min(opt.step_count, self.total), desc=self.cfg.method,
                   unit="step", dynamic_ncols=True)
        smooth = history[-1]["loss"] if history else math.nan
        with self.stop.deferred():
            self._steps(state, bar, smooth)

    def _steps(self, state: dict, bar, smooth: float) -> None:
        opt, history = self.optimizer, state["history"]
        faults, saved = 0, None  # non-finite steps in a row; the step of the last checkpoint written
        while opt.step_count < self.total and self.stop.requested is None:
            info = self.step(self.encode(self.cursor.next_batch()))
            done = opt.step_count
            record = {"step": done, "loss": info.loss, "sigma": info.sigma, "lr": info.lr,
                      "forward_passes": info.forward_passes, "seconds": info.seconds, "skipped": info.skipped}
            if info.skipped:
                record["reason"] = info.reason
                bar.write(f"step {done}: {info.reason}")
            if info.objective:
                record["reward"] = info.objective.get("rewards", [math.nan])[0]
                record["rewards"] = info.objective.get("rewards")
                record["completion_tokens"] = info.objective.get("completion_lengths")
                record["timing"] = info.timing
            if info.dropped_examples:
                record["dropped_examples"] = info.dropped_examples
                bar.write(f"step {done}: example(s) {info.dropped_examples} of the batch had a non-finite loss and "
                          "were left out of the step's estimate (in every group alike)")
            history.append(record)
            faults = faults + 1 if info.nonfinite else 0
            if math.isfinite(info.loss):
                smooth = info.loss if not math.isfinite(smooth) else 0.9 * smooth + 0.1 * info.loss
            sigma = "" if info.sigma is None else f" sigma={info.sigma:.2e}"
            if "reward" in record:
                sigma += f" reward={record['reward']:.3f}"
            bar.set_postfix_str(f"loss={smooth:.4f}{sigma} fwd={info.forward_passes:,} "
                                f"ex/s={self.cfg.batch_size / max(info.seconds, 1e-9):.1f}")
            bar.update(1)
            if done % self.eval_every == 0 or done == self.total:
                ev = self.evaluation("validation", "train")
                state["evals"].append(ev)
                bar.write(f"step {done} ({ev['forward_passes']:,} forward passes): validation {describe(ev)}")
            if faults >= MAX_NONFINITE_STEPS:
                bar.close()
                hint = "a smaller --lr" + (f", or --dtype float32 instead of {self.cfg.dtype}"
                                           if self.cfg.dtype != "float32" else "")
                raise FinetuneError(
                    f"steps {done - faults + 1}-{done}: {faults} steps in a row were skipped because a loss or an "
                    f"updated weight was not finite (last: {info.reason}); the run stopped. The weights are "
                    f"finite and {self._newest_checkpoint_text()}. Start again with {hint}")
            stopping = self.stop.requested is not None
            if self.main and (done % self.checkpoint_every == 0 or done == self.total or stopping):
                write_checkpoint(self.out, self.model, opt, self.cursor, state)
                saved = done
        bar.close()
        if self.stop.requested is not None:
            wrote = f"checkpoint step-{saved:08d} written. " if saved is not None else ""
            raise RunStopped(f"stopped by {self.stop.requested} after step {opt.step_count}; {wrote}Continue with "
                             f"the same command and --resume --output-dir {self.out}", self.stop.signum)

    def _newest_checkpoint_text(self) -> str:
        newest = latest_checkpoint(self.out)
        return (f"the newest checkpoint, {newest.name}, is intact" if newest is not None
                else "no checkpoint had been written yet")

    def compile_phase(self) -> None:
        """Build the grouped graph and the generator kernels before the first step, as their own phase.

        The first evaluation of a group table rewrites the graph and compiles the direction
        generators (tens of seconds, minutes on a busy CPU); inside the step bar that time would
        make step 1 look like the rate and the ETA hours long. One evaluation of the step's group
        table on a training batch does it here; it changes nothing (a pure function of the weights).
        """
        zm, table = getattr(self.optimizer, "zm", None), getattr(self.optimizer, "table", None)
        if zm is None or table is None:
            return
        with tqdm(total=1, desc="compile", unit="graph", dynamic_ncols=True) as bar:
            zm.group_losses(self.encode(self.task.train[:self.cfg.batch_size]), table())
            bar.update(1)

    def finish(self, state: dict) -> dict:
        """Final evaluations; metrics.json, trajectory.json, model.safetensors, curves.png; the summary."""
        opt, evals = self.optimizer, state["evals"]
        if not any(e["split"] == "validation" and e["step"] == opt.step_count and e["phase"] != "zero_shot"
                   for e in evals):
            evals.append(self.evaluation("validation", "final"))
        evals.append(self.evaluation("test", "final"))
        metrics = self.metrics(state)
        if not self.main:
            return metrics
        with writing("the trained weights", self.out / "model.safetensors", needed=self.trainable_bytes), \
                atomic_path(self.out / "model.safetensors") as tmp:
            save_file({n: p.detach().contiguous() for n, p in opt.params.items()}, str(tmp))
        if opt.trajectory is not None:
            with writing("the trajectory", self.out / "trajectory.json"):
                opt.trajectory.save(self.out / "trajectory.json")
        with writing("the curves", self.out / "curves.png"):
            plot_curves(metrics, self.out / "curves.png")
        with writing("the metrics", self.out / "metrics.json"):
            atomic_write_json(self.out / "metrics.json", metrics, indent=1)
        print(summary_table(metrics, self.out), flush=True)
        try:  # last: a model transformers cannot save must not cost the run's other outputs
            folder = export_pretrained(self.model, self.tokenizer, self.out)
            print(f"saved {folder} (load it with {'PeftModel' if folder.name == 'adapter' else 'AutoModel*'}"
                  ".from_pretrained)", flush=True)
        except Exception as err:  # noqa: BLE001 - reported, the weights are in model.safetensors
            print(f"[zo_fx] could not write a from_pretrained folder ({type(err).__name__}: {err}); the trained "
                  "weights are in model.safetensors and trajectory.json", flush=True)
        return metrics

    def metrics(self, state: dict) -> dict:
        """What ``metrics.json`` holds: settings, task, model, step history, evaluations, final numbers."""
        opt, evals, history = self.optimizer, state["evals"], state["history"]
        keys = (*self.task_record()["metric_keys"], "n", "non_finite", "failed")

        def last(split: str, zero_shot: bool) -> dict:
            picked = [e for e in evals if e["split"] == split and (e["phase"] == "zero_shot") == zero_shot]
            return {k: picked[-1].get(k, 0) for k in keys if k in picked[-1] or k == "non_finite"} if picked else {}

        return {
            "settings": state["settings"],
            "task": self.task_record(),
            "model": {"name": self.cfg.model, "class": type(self.model).__name__,
                      "parameters": sum(p.numel() for p in self.model.parameters()),
                      "trainable": sum(p.numel() for p in opt.params.values())},
            "history": history,
            "evals": evals,
            "final": {
                "zero_shot": {s: last(s, True) for s in ("validation", "test")},
                "fine_tuned": {s: last(s, False) for s in ("validation", "test")},
                "steps": opt.step_count,
                "forward_passes": opt.forward_passes,
                "skipped_steps": sum(1 for h in history if h["skipped"]),
                "train_seconds": sum(h["seconds"] for h in history),
                "wall_seconds": time.perf_counter() - self.wall0,
            },
        }


def export_pretrained(model, tokenizer, out: Path) -> Path:
    """The trained model as Hugging Face loads it: ``out/adapter`` (a PEFT adapter, for
    ``PeftModel.from_pretrained(base, ...)``) or ``out/model`` (``save_pretrained`` weights, config
    and tokenizer, for ``AutoModelForCausalLM.from_pretrained``). Written beside, then renamed."""
    is_peft = hasattr(model, "peft_config")
    final = out / ("adapter" if is_peft else "model")
    tmp = out / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(f"the {final.name}/ folder", out):
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def job_class(cfg: FinetuneConfig) -> type[FinetuneJob]:
    """The job a task needs: rewards on generated text, answers (cross-entropy, then EM/F1), or labels."""
    if cfg.is_reward_task:
        from zo_fx.finetune.reward import RewardJob

        return RewardJob
    from zo_fx.finetune.answers import AnswerJob, is_answer_task

    return AnswerJob if is_answer_task(cfg) else FinetuneJob


def run(cfg: FinetuneConfig) -> dict:
    """Run the job of ``cfg`` end to end and return what ``metrics.json`` holds.

    Launched by ``torchrun``, the process joins the group first; ranks other than 0 run silent.
    A file that cannot be written (disk full, a size limit, permissions) ends the run with a
    :class:`FinetuneError` that says what failed and that ``--resume`` continues from the newest
    intact checkpoint; SIGTERM ends it with :class:`RunStopped` after a checkpoint.
    """
    distributed = init_from_env()
    with contextlib.ExitStack() as quiet:
        if not is_main_process():  # prints and progress bars; an error still surfaces once the context exits
            sink = quiet.enter_context(open(os.devnull, "w"))  # noqa: SIM115 - closed by the exit stack
            quiet.enter_context(contextlib.redirect_stdout(sink))
            quiet.enter_context(contextlib.redirect_stderr(sink))
        stop = quiet.enter_context(StopSignal().installed(active=not distributed))
        job = job_class(cfg)(cfg, stop)
        try:
            with job.lock:
                state = job.start()
                job.train(state)
                return job.finish(state)
        except WriteError as err:
            newest = latest_checkpoint(job.out)
            kept = (f"the newest intact checkpoint, {newest.name}, is kept: free space (or lift the limit) and "
                    f"continue with the same command and --resume --output-dir {job.out}" if newest is not None
                    else "no checkpoint of this run had been written yet: free space (or lift the limit) and run "
                         "again")
            raise FinetuneError(f"{err}. Nothing was half-written: {kept}") from None
