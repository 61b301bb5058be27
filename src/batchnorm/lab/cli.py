"""The `batchnorm` command (also `python -m batchnorm`).

    batchnorm demo                              seed 000's circles, BN vs no BN -> runs/demo/report.html
    batchnorm list                              the experiments and their defaults
    batchnorm run mlp                           seed 002's MLP on digits (offline), 3 seeds
    batchnorm run cnn --data mnist --data-dir data --epochs 5
    batchnorm run lr-sweep --seeds 5 --grid 0.01,0.1,1,3
    batchnorm run batch-sweep --variants none,bn --grid 2,8,32,128
    batchnorm run mlp --out runs/mlp --resume   continue an interrupted run
    batchnorm run cnn --nproc 2                 data-parallel: DDP + SyncBatchNorm in 2 processes
    torchrun --standalone --nproc_per_node 2 -m batchnorm run cnn      the same, started by torchrun
    batchnorm download mnist --data-dir data    fetch the IDX files, SHA-256 verified
    batchnorm suite --jobs 2                    every claim behind the README's table (--quick: a first look)
    batchnorm doctor model.pt --html doctor.html   check a checkpoint's BN layers (exit 1 on problems)

Every run writes metrics.csv, summary.json, PNG figures and report.html into its --out folder
(default runs/EXPERIMENT).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .config import INITS
from .flags import JOBS, NPROC, TIMEOUT, bounded, finite_list, learning_rates, momenta, number

__all__ = ["main", "run_overrides"]

DEMO_OUT = Path("runs") / "demo"
# = lab.distributed.DEFAULT_TIMEOUT and PEER_FAILED (not imported: `batchnorm list` starts without torch)
DEFAULT_TIMEOUT = 300.0
PEER_FAILED = 3


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchnorm", description="The batchnorm lab: BN vs no BN, and BN's claims tested over seeds.",
        epilog="Examples:\n" + "\n".join(__doc__.splitlines()[2:15]), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,run,suite,list,download,doctor}")

    demo = sub.add_parser("demo", help="seed 000's concentric circles, BN vs no BN, with its report")
    demo.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEMO_OUT}, replaced on each demo)")
    demo.add_argument("--seeds", type=number("seeds"), default=None, help="seeds per variant (default 5)")
    demo.add_argument("--epochs", type=number("epochs"), default=None, help="epochs (default 500, as seed 000)")
    demo.add_argument("--overwrite", action="store_true", help="replace the run in --out")

    run = sub.add_parser("run", help="run an experiment or a claims sweep (see `batchnorm list`)")
    run.add_argument("experiment", help="circles, mlp, cnn, seed002, regularization, lr-sweep, depth-sweep, batch-sweep, ghost-sweep, eval-sweep, gap-sweep, placement, smoothness, activations, shift (see `batchnorm list`)")
    run.add_argument("--seeds", type=number("seeds"), help="seeds per variant (runs with seeds 0..K-1)")
    run.add_argument("--epochs", type=number("epochs"), help="epochs per run")
    run.add_argument("--steps", type=number("steps"), help="batch-sweep: SGD steps at every batch size (sets the epochs)")
    run.add_argument("--lr", type=number("lr"), help="SGD learning rate")
    run.add_argument("--batch-size", type=number("batch_size"), dest="batch_size", help="mini-batch size, 0 = full batch")
    run.add_argument("--data", help="circles, digits (bundled, offline), mnist or fashion-mnist")
    run.add_argument("--data-dir", dest="data_dir", help="folder with the MNIST IDX files (default data)")
    run.add_argument("--limit", type=number("limit"), help="use only the first N train and test examples")
    run.add_argument("--train-size", type=number("train_size"), dest="train_size",
                     help="train on only the first N training examples, test on the whole test split (0 = all)")
    run.add_argument("--target", type=number("target"), help="test accuracy counted as converged (epochs_to_target)")
    run.add_argument("--grid", type=finite_list, help="the swept values, comma-separated (sweeps only)")
    run.add_argument("--variants", type=_names, help="normalization variants to compare, comma-separated (sweeps)")
    run.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                     help="standardize inputs with the training split's per-feature mean and std (a control)")
    run.add_argument("--init", choices=INITS, help="weight init: PyTorch's default or He (a control)")
    run.add_argument("--tune-lr", dest="tune_lr", type=learning_rates,
                     help="choose each variant's lr on a validation split from these values (a control); none = off")
    run.add_argument("--tune-seeds", dest="tune_seeds", type=number("tune_seeds"), help="seeds per learning rate when tuning")
    run.add_argument("--momenta", type=momenta, help="eval-sweep: BN momentum values to train with, comma-separated (0 < m <= 1)")
    run.add_argument("--log-every", type=number("log_every"), dest="log_every", help="print progress every N epochs (0 = last only)")
    run.add_argument("--threads", type=number("threads"), help="torch CPU threads (default 1: fastest for these small nets)")
    run.add_argument("--nproc", type=bounded(NPROC), help="train data-parallel in N local processes (DDP + SyncBatchNorm, gloo)")
    run.add_argument("--timeout", type=bounded(TIMEOUT), default=None,
                     help=f"data-parallel: seconds a process waits for the others before failing (default {DEFAULT_TIMEOUT:g})")
    run.add_argument("--quick", action="store_true",
                     help="a first look: 2 seeds and about a quarter of the training (verdicts are then inconclusive)")
    run.add_argument("--out", type=Path, help="output folder (default runs/EXPERIMENT)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --out")

    suite = sub.add_parser("suite", help="every claims experiment behind the README's lab table, with its controls")
    suite.add_argument("--quick", action="store_true", help="each experiment's --quick: a first look")
    suite.add_argument("--jobs", type=bounded(JOBS), default=1, help="experiments run at a time (default 1)")
    suite.add_argument("--only", type=_names, help="comma-separated experiment names (default: all of the suite)")
    suite.add_argument("--out", type=Path, default=Path("runs") / "suite", help="output folder (default runs/suite)")
    suite.add_argument("--resume", action="store_true", help="continue each interrupted experiment in --out")
    suite.add_argument("--overwrite", action="store_true", help="replace the runs in --out")

    sub.add_parser("list", help="list the experiments and their defaults")

    download = sub.add_parser("download", help="download MNIST or Fashion-MNIST, verifying SHA-256 checksums")
    download.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    download.add_argument("--data-dir", dest="data_dir", default="data", help="where to put DATASET/ (default data)")
    download.add_argument("--base-url", dest="base_url", help="fetch from this URL prefix instead of the public mirrors")

    doctor = sub.add_parser("doctor", help="check the BatchNorm layers of a state_dict file (exit status 1 on problems)")
    doctor.add_argument("checkpoint", type=Path, help="a state_dict saved with torch.save (loaded with weights_only=True)")
    doctor.add_argument("--html", type=Path, default=None, help="also write a self-contained HTML report with per-layer plots")
    doctor.add_argument("--key", default=None, help="the entry holding the state_dict in a checkpoint dict (e.g. model)")
    return parser


def _list() -> int:
    from .experiments import EXPERIMENTS

    for e in EXPERIMENTS.values():
        d = e.defaults
        batch = "swept" if e.setting_name in ("batch size", "training batch size") else (d.get("batch_size", 64) or "full")
        epochs = "swept" if e.setting_name == "epochs trained" else d.get("epochs", 10)
        knobs = f"seeds {d.get('seeds', 3)}, epochs {epochs}, batch {batch}, data {d.get('data')}"
        if e.setting_name:
            knobs += f", --grid ({e.setting_name}) {','.join(f'{v:g}' for v in d['grid'])}"
            knobs += f", --variants {','.join(d['variants'])}"
        if d.get("momenta"):
            knobs += f", --momenta {','.join(f'{m:g}' for m in d['momenta'])}"
        print(f"{e.name:12s} {e.title}\n{'':12s} defaults: {knobs}")
    return 0


def _run(name: str, overrides: dict, out: Path, resume: bool, overwrite: bool) -> int:
    from .runner import start

    summary = start(name, overrides, out, resume=resume, overwrite=overwrite)
    if summary is None:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    print()
    for variant, v in summary["variants"].items():
        acc = v["final_test_accuracy"]
        loss = v["final_train_loss"]
        epochs = "never" if v["epochs_to_target"] is None else f"{v['epochs_to_target']:.1f}"
        print(f"{variant:>16s}: final test accuracy {100 * acc:5.1f}%  final train loss "
              f"{'nan' if loss is None else f'{loss:.4f}'}  epochs to {100 * summary['target_accuracy']:.0f}%: {epochs}"
              if acc is not None else f"{variant:>16s}: diverged")
    for c in summary["claims"]:
        interval = f"\n    {c['interval']}: {c['reason']}" if c.get("interval") else ""
        print(f"[{c['verdict']}] {c['claim']}{interval}\n    {c['evidence']}")
    print(f"\nreproduce: {summary['command']}\nreport: {out / 'report.html'}")
    return 0


def _suite(args) -> int:
    from .suite import run_suite

    report = run_suite(args.out, quick=args.quick, jobs=args.jobs, only=args.only, overwrite=args.overwrite,
                       resume=args.resume)
    print(f"\nsuite: {len(report['experiments'])} experiments in {report['wall_seconds']:.0f} s wall-clock, --jobs "
          f"{report['jobs']}, load average before {report['load_before']} after {report['load_after']}")
    failed = 0
    for name, r in report["experiments"].items():
        failed += r["exit_code"] != 0
        verdicts = ", ".join(c["verdict"] for c in r.get("claims", [])) or f"failed (exit {r['exit_code']}, see {name}.log)"
        print(f"{name:>15s} {r['seconds']:7.0f} s  {verdicts}")
    print(f"details: {args.out / 'suite.json'} and {args.out}/<experiment>/report.html")
    return 1 if failed else 0


# How gloo says that a peer is gone or silent (it raises plain RuntimeErrors with these).
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe")


def _peer_failed(error: BaseException, kinds: tuple[type, ...]) -> bool:
    """Did `error` come from a broken collective (a peer failed)? SyncBatchNorm and our own helpers
    re-raise the backend's error with a clearer message, so look down the chain of causes."""
    while error is not None:
        if isinstance(error, kinds) or any(words in str(error).lower() for words in _PEER_GONE):
            return True
        error = error.__cause__
    return False


def _is_other_rank() -> bool:
    """A data-parallel rank other than 0 (those print nothing: rank 0 speaks for the run)."""
    return os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ


def _run_ranks(args, overrides: dict, out: Path, argv: list[str]) -> int:
    """`run`, as one process, as one rank of a data-parallel run, or as the launcher of `--nproc` ranks."""
    from . import distributed

    ranks = distributed.from_environment()
    if ranks is not None:  # started by `--nproc` or by torchrun: train as this rank
        if args.nproc is not None and args.nproc != ranks.world:
            raise ValueError(f"--nproc {args.nproc} disagrees with WORLD_SIZE={ranks.world} set by the launcher; drop --nproc under torchrun")
        with distributed.process_group(ranks, args.timeout or DEFAULT_TIMEOUT):
            return _run(args.experiment, overrides, out, args.resume, args.overwrite)
    if args.nproc and args.nproc > 1:
        from .lock import HOLDER_ENV
        from .runner import check, claim

        # Bad input fails here, once, before any rank starts; then the launcher locks the folder for
        # the whole run (the ranks, told so by HOLDER_ENV, do not lock it again).
        check(args.experiment, overrides, out, resume=args.resume, overwrite=args.overwrite, nproc=args.nproc)
        lock = claim(out, args.resume, args.overwrite)
        try:
            held = {HOLDER_ENV: str(lock.path.resolve())} if lock is not None else {}
            return distributed.launch(argv, args.nproc, env=held)
        finally:
            if lock is not None:
                lock.release()
    return _run(args.experiment, overrides, out, args.resume, args.overwrite)


# The `run` flags that are RunConfig fields (the rest say where and how to run, not what).
RUN_FIELDS = ("seeds", "epochs", "steps", "lr", "batch_size", "data", "data_dir", "limit", "train_size", "target", "grid", "variants",
              "standardize", "init", "tune_lr", "tune_seeds", "momenta", "log_every", "threads")


def run_overrides(args: argparse.Namespace) -> dict:
    """The RunConfig fields `batchnorm run` was given (None where a flag was not)."""
    return {k: getattr(args, k) for k in RUN_FIELDS}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # `kill` (SIGTERM) stops a run the way Ctrl-C does: finished epochs are saved for --resume.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "list":
            return _list()
        if args.command == "download":
            from .data import download

            download(args.dataset, args.data_dir, args.base_url)
            return 0
        if args.command == "doctor":
            from ..tools.doctor_report import doctor

            return doctor(args.checkpoint, args.html, args.key)
        if args.command == "demo":
            out = args.out or DEMO_OUT
            overrides = {"seeds": args.seeds, "epochs": args.epochs}
            # The demo's own folder is replaced on every demo; a folder you name is only with --overwrite.
            return _run("circles", overrides, out, False, args.overwrite or args.out is None)
        if args.command == "suite":
            return _suite(args)
        overrides = run_overrides(args)
        if args.quick:
            from .suite import quick_overrides

            overrides = {**quick_overrides(args.experiment), **{k: v for k, v in overrides.items() if v is not None}}
        out = args.out or Path("runs") / args.experiment
        return _run_ranks(args, overrides, out, sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        if args.command in ("run", "demo") and not _is_other_rank():
            out = getattr(args, "out", None) or (DEMO_OUT if args.command == "demo" else Path("runs") / args.experiment)
            name = "circles" if args.command == "demo" else args.experiment
            print(f"\ninterrupted; finished epochs are saved. Continue with: batchnorm run {name} --out {out} --resume",
                  file=sys.stderr)
        return 130
    except ValueError as e:  # DataError, RunError, CorruptFile, FolderInUse, bad flag values are ValueErrors
        print(f"batchnorm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk is full, a folder became read-only, ...: say so, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        print(f"batchnorm: error: cannot read or write a file{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        # A data-parallel rank whose peers failed: say so in one line, not a backend traceback.
        from torch.distributed import DistError

        from .distributed import DistributedRunError

        if not _peer_failed(e, (DistributedRunError, DistError)):
            raise
        message = " ".join(str(e).split())[:500]
        if not message.startswith("rank "):
            message = f"rank {os.environ.get('RANK', '?')}: {message}"
        print(f"batchnorm: error: {message}", file=sys.stderr)
        return PEER_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
