"""Which tiny models zo_fx compiles, and whether what it computes is right.

For every entry of ``tests/zoo_more.py``'s ``ZOO`` (or ``--only NAME``, repeatable)
this builds the tiny model and its batch, calls ``zo_fx.zo_compile(model, batch)``,
evaluates ``zm.group_losses`` on the table ``GroupTable([5, 5, 0], [1.0, -1.0, 0.0],
1e-3, "rademacher")`` and compares it with ``tests/explicit.py``'s reference (the eager
model with its weights explicitly perturbed). Every exception is caught per model.

One line per model: name, status, seconds (build / compile / groups / reference). Status:

* ``ok``: max relative error of the G x B losses within ``--tol`` (1e-9 for float64
  outputs, 1e-5 for float32 ones, e.g. Mamba casts its logits to float32), and the
  difference l_0 - l_1 (what a ZO step uses) within ``--diff-tol`` of the reference's;
* ``MISMATCH rel_err=..``: it ran without error and computed something else (the
  important finding: a silent wrong answer);
* ``NO-EFFECT``: it matches, but the perturbation changes no loss (l_0 == l_1 in
  the reference): the zoo entry does not exercise the perturbation;
* ``PARTIAL``: it matches, but some trainable tensors are not among the compiled
  module's parameters (or their direction is all zero). The reference perturbs what
  ``zm.direction`` returns, so it cannot see a tensor the compiler silently froze;
* ``<phase> <ErrorType>: <message[:200]>``: phase is build, compile (zo_compile),
  groups (zm.group_losses, where the rewrite runs) or reference.

With ``--reach`` it also checks, in eager mode only, that perturbing each trainable
tensor on its own changes the loss (a property of the zoo, not of zo_fx). With
``--control`` the reference uses other seeds ([6, 6, 0]) than the compiled table: a
negative control, every entry whose perturbation reaches the loss must then MISMATCH.

Output torch prints while a model fails (export dumps the whole graph to stderr) is kept
out of the table; its tail is in the JSON (``stderr_tail``); ``--verbose`` shows it.

    python benchmarks/coverage_probe.py --json runs/coverage_probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from explicit import explicit_group_losses  # noqa: E402
from zoo_more import ZOO  # noqa: E402

import zo_fx  # noqa: E402
from zo_fx.losses import default_loss  # noqa: E402

TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
DIFF_TOL = {torch.float64: 1e-6, torch.float32: 5e-2}


class ProbeTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise ProbeTimeout("probe timed out")


def _table() -> zo_fx.GroupTable:
    return zo_fx.GroupTable([5, 5, 0], [1.0, -1.0, 0.0], 1e-3, "rademacher")


def _error(phase: str, err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{phase} {type(err).__name__}: {msg[:200]}"


def reach(model, batch, loss_fn, eps: float = 1e-3, seed: int = 0) -> list[str]:
    """Trainable tensors whose perturbation alone leaves every loss unchanged (eager, in place, restored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    g = torch.Generator().manual_seed(seed)
    dead = []
    with torch.no_grad():
        base = loss_fn(model(**inputs).logits, batch)
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            saved = p.detach().clone()
            p.add_(eps * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            moved = loss_fn(model(**inputs).logits, batch)
            p.copy_(saved)
            if torch.equal(moved, base):
                dead.append(name)
    return dead


def probe(name: str, make_model, make_batch, loss, args) -> dict:
    rec: dict = {"name": name, "status": None, "phase": None}
    phase = "build"
    try:
        t = time.perf_counter()
        model = make_model()
        batch = make_batch()
        rec["build_s"] = time.perf_counter() - t
        loss_fn = loss or default_loss(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        rec["trainable_tensors"] = len(trainable)
        rec["trainable_numel"] = sum(p.numel() for p in trainable)
        if args.reach:
            phase = "reach"
            rec["dead_tensors"] = reach(model, batch, loss_fn)

        phase = "compile"
        t = time.perf_counter()
        zm = zo_fx.zo_compile(model, batch, loss=loss)
        rec["compile_s"] = time.perf_counter() - t
        rec["compiled_tensors"] = len(zm.pids)

        phase = "groups"
        table = _table()
        t = time.perf_counter()
        compiled = zm.group_losses(batch, table)
        rec["groups_s"] = time.perf_counter() - t
        try:
            rec["report"] = zm.report(groups=table.groups).summary()
        except Exception as err:  # the report is extra information; never fail the probe on it
            rec["report"] = _error("report", err)

        trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        rec["not_compiled"] = [n for n in trainable_names if n not in zm.pids]
        rec["zero_direction"] = [n for n, u in zm.direction(table.seeds[0], table.kind).items() if not u.any()]

        phase = "reference"
        ref_table = zo_fx.GroupTable([6, 6, 0], list(table.coefs), table.eps, table.kind) if args.control else table
        t = time.perf_counter()
        ref = explicit_group_losses(model, zm, batch, ref_table, loss_fn=loss_fn)
        rec["reference_s"] = time.perf_counter() - t
    except Exception as err:
        rec["phase"] = phase
        rec["status"] = _error(phase, err)
        rec["traceback"] = traceback.format_exc(limit=-8)
        return rec

    out_dtype = ref.dtype
    tol = args.tol if args.tol is not None else TOL.get(out_dtype, 1e-5)
    diff_tol = args.diff_tol if args.diff_tol is not None else DIFF_TOL.get(out_dtype, 5e-2)
    compiled = compiled.to(ref.dtype)
    rel = ((compiled - ref).abs() / ref.abs().clamp_min(torch.finfo(ref.dtype).tiny)).max().item()
    ref_diff, cmp_diff = ref[0] - ref[1], compiled[0] - compiled[1]
    scale = ref_diff.abs().max().item()
    diff_rel = (cmp_diff - ref_diff).abs().max().item() / scale if scale > 0 else float("inf")
    rec.update(
        output_dtype=str(out_dtype).replace("torch.", ""), rel_err=rel, diff_rel_err=diff_rel, tol=tol,
        diff_tol=diff_tol, ref_g0_g1_max_abs_diff=scale, compiled_g0_g1_max_abs_diff=cmp_diff.abs().max().item(),
        ref_groups_differ=bool(scale > 0), compiled_groups_differ=bool(cmp_diff.abs().max().item() > 0),
        losses_compiled=compiled.tolist(), losses_reference=ref.tolist(),
    )
    rec["phase"] = "done"
    if rel > tol or (scale > 0 and diff_rel > diff_tol):
        rec["status"] = f"MISMATCH rel_err={rel:.2e} diff_rel_err={diff_rel:.2e}"
    elif scale == 0:
        rec["status"] = f"NO-EFFECT rel_err={rel:.2e} (l_0 == l_1 in the reference)"
    elif rec["not_compiled"] or rec["zero_direction"]:
        rec["status"] = (f"PARTIAL not compiled: {rec['not_compiled']}; zero direction: {rec['zero_direction']}")
    else:
        rec["status"] = "ok"
    return rec


def _code_version() -> dict:
    """The commit the probe ran on and the zo_fx files changed on top of it (the compiler moves fast)."""
    root = TESTS.parent

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "zo_fx_changes": git("status", "--porcelain", "--", "zo_fx")}
    except (OSError, subprocess.SubprocessError):
        return {}


def _fmt_s(rec: dict, key: str) -> str:
    return f"{rec[key]:.2f}" if key in rec else "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=None, metavar="NAME", help=f"one of {', '.join(ZOO)}")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH")
    ap.add_argument("--reach", action="store_true", help="also check each trainable tensor reaches the loss (eager)")
    ap.add_argument("--tol", type=float, default=None, help="max relative error of the losses (default by dtype)")
    ap.add_argument("--diff-tol", type=float, default=None, help="max relative error of l_0 - l_1 (default by dtype)")
    ap.add_argument("--control", action="store_true", help="negative control: reference with other seeds")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model (0: none)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of every failure")
    args = ap.parse_args(argv)

    names = args.only or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(ZOO)}")

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    use_alarm = args.timeout > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _alarm)
    width = max(len(n) for n in names)
    version = _code_version()
    print(f"zo_fx at {version.get('commit', '?')[:12]}" + (" + uncommitted zo_fx changes" if version.get(
        "zo_fx_changes") else ""))
    print(f"{'model':<{width}}  {'build':>6} {'compile':>7} {'groups':>6} {'ref':>6}  status")
    records = []
    for name in names:
        make_model, make_batch, loss = ZOO[name]
        t = time.perf_counter()
        if use_alarm:
            signal.alarm(args.timeout)
        captured = io.StringIO()
        quiet = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(captured)
        try:
            with quiet:
                rec = probe(name, make_model, make_batch, loss, args)
        except ProbeTimeout as err:  # raised outside probe's own handler
            rec = {"name": name, "status": _error("timeout", err), "phase": "timeout"}
        finally:
            if use_alarm:
                signal.alarm(0)
        if captured.getvalue():
            rec["stderr_tail"] = captured.getvalue()[-2000:]
        rec["total_s"] = time.perf_counter() - t
        records.append(rec)
        extra = f" dead={rec['dead_tensors']}" if rec.get("dead_tensors") else ""
        print(f"{name:<{width}}  {_fmt_s(rec, 'build_s'):>6} {_fmt_s(rec, 'compile_s'):>7} "
              f"{_fmt_s(rec, 'groups_s'):>6} {_fmt_s(rec, 'reference_s'):>6}  {rec['status']}{extra}", flush=True)
        if args.verbose and "traceback" in rec:
            print(rec["traceback"])

    counts: dict[str, int] = {}
    for rec in records:
        key = rec["status"].split()[0] if rec["phase"] == "done" else f"{rec['phase']}-error"
        counts[key] = counts.get(key, 0) + 1
    print("summary: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    mismatches = [r["name"] for r in records if r["status"].startswith("MISMATCH")]
    if mismatches:
        print(f"MISMATCH (ran without error, wrong losses): {', '.join(mismatches)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {**vars(args), "json": str(args.json), "torch": torch.__version__, **version}
        args.json.write_text(json.dumps({"settings": settings, "counts": counts, "results": records}, indent=2))
    return records


if __name__ == "__main__":
    main()
