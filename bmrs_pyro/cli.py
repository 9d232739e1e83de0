"""The ``bmrs`` command line: ``bmrs run`` trains and prunes, ``bmrs report`` rebuilds a report.

Each subcommand is a :class:`Command`: a function that adds its arguments to a sub-parser and a
handler ``handler(args) -> exit code``. :data:`COMMANDS` lists them and :func:`build_parser`
registers them in that order, so a new subcommand is one more ``Command(...)`` entry (see the
marked place near the end of this module). The work itself lives in :mod:`bmrs_pyro.runs`.

Exit codes: 0 success, 2 bad input (unknown names, invalid numbers, bad data, unwritable or missing
folders, a run folder locked by another process; the message goes to stderr, no traceback), 1 a
failure during the run (e.g. training diverged, disk full), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .launch import run_hook
from .checks import arg_fraction, arg_nonneg_float, arg_nonneg_int, arg_positive_float, arg_positive_int
from .baselines import METHODS
from .compare import PARTIAL_FILE, QUICK_BUDGET, CompareConfig, format_markdown, resolve_methods, run_compare
from .criteria import CRITERIA
from .data import DATASETS
from .infer import DEFAULT_PRUNE_WARMUP, TrainingDivergedError
from .runlock import RunLock
from .run_config import CONFIG_FILE, DEFAULT_PRUNE_EVERY, METRICS_FILE, RunConfig, ensure_writable, parse_hidden, read_run_config
from .run_summary import format_summary
from .runs import execute, stderr_log
from bmrs_pyro.analysis.report import build_report
from bmrs_pyro.models import MODELS, NORMS

PROG = "bmrs"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """Bad command-line input that argparse itself does not catch (exit code 2)."""


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its options, ``handler(args)`` runs it."""

    name: str
    help: str
    description: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser, bool], None]
    handler: Callable[[argparse.Namespace, Sequence[str]], int]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option, epilogs kept as written (they hold example commands)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # A flag's "default" is the state without it (e.g. --no-report: True); showing it misleads.
        if action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


# ------------------------------------------------------------------------------ value parsers


def _hidden(text: str) -> tuple[int, ...]:
    try:
        return parse_hidden(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ------------------------------------------------------------------------------ bmrs run

_RUN_EPILOG = """\
examples:
  bmrs run                                  digits, MLP 100-100 tanh, BMRS_N, continuous pruning
  bmrs run --model lenet5 --epochs 50       LeNet-5 on digits
  bmrs run --method bmrs_u --bits 4         BMRS_U with a 4-bit reduced prior
  bmrs run --method none                    the same training, nothing removed (the baseline)
  bmrs run --margin 0                       the strict rule: prune only where dF >= 0
  bmrs run --method l2 --fraction 0.5       remove the 50 % lowest-L2 structures after training
  bmrs run --data mnist --root ~/data --model lenet5 --device cuda
  bmrs run --resume runs/digits-mlp-bmrs_n-20250101-120000 --epochs 400
"""


def _add_run_arguments(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    d = RunConfig()

    def default(value: Any) -> Any:
        # With suppress=True only options given on the command line appear in the namespace:
        # that is how --resume tells overrides from defaults.
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("data and model")
    g.add_argument("--data", choices=DATASETS, default=default(d.data), help="data set")
    g.add_argument("--root", default=default(d.root), help="folder holding the files of mnist, fashion_mnist, cifar10")
    g.add_argument("--model", choices=list(MODELS), default=default(d.model), help="network")
    g.add_argument("--hidden", type=_hidden, default=default("100,100" if not suppress else None),
                   help="hidden widths of the mlp, comma-separated")
    g.add_argument("--activation", choices=("tanh", "relu", "gelu", "sigmoid"), default=default(d.activation),
                   help="activation of the mlp")
    g.add_argument("--norm", choices=NORMS, default=default(d.norm),
                   help="batch: a BatchNorm before every activation of the mlp or lenet5")

    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=list(CRITERIA), default=default(d.method),
                   help="pruning criterion; bmrs_n, bmrs_u and snr decide by themselves, the others need --fraction; "
                        "none trains the same network and removes nothing (the baseline to compare with)")
    g.add_argument("--fraction", type=arg_fraction, default=default(d.fraction),
                   help="remove this share of structures, lowest-ranked first (post-training)")
    g.add_argument("--bits", type=arg_nonneg_int, default=default(d.bits),
                   help="bmrs_u: the reduced prior is log-uniform up to 2^-bits")
    g.add_argument("--margin", type=arg_nonneg_float, default=default(d.margin),
                   help="bmrs_n/bmrs_u: keep a structure only when the log evidence for it, -dF, is at least this "
                        "many nats (prune where dF >= -margin). None: 1, the 'positive evidence' boundary of Kass & "
                        "Raftery (1995); 0 is the strict rule dF >= 0. A constant of the evidence scale: not for tuning")
    g.add_argument("--reference-code", action="store_true", default=default(False),
                   help="bmrs_n: decide as the authors' public code does (its dF lacks -0.5 log 2pi, so it prunes "
                        "where the exact dF >= -0.919): the margin 0.919; the reported dF stays exact")
    g.add_argument("--prune-every", type=arg_nonneg_int, default=default(d.prune_every),
                   help=f"epochs between continuous-pruning steps; 0 = prune once after training. "
                        f"None: {DEFAULT_PRUNE_EVERY} for bmrs_n/bmrs_u/snr, 0 with --fraction")
    g.add_argument("--prune-start", type=arg_positive_int, default=default(d.prune_start),
                   help=f"continuous pruning: the epoch after which the first reduction happens (a warm-up, so that "
                        f"no structure is judged before the data have moved its posterior). None: "
                        f"{int(DEFAULT_PRUNE_WARMUP * 100)} %% of --epochs")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=arg_positive_int, default=default(d.epochs), help="training epochs")
    g.add_argument("--lr", type=arg_positive_float, default=default(d.lr), help="Adam learning rate of the weights")
    g.add_argument("--guide-lr", type=arg_positive_float, default=default(d.guide_lr),
                   help="Adam learning rate of the variational parameters (loc, log scale of log theta)")
    g.add_argument("--batch-size", type=arg_positive_int, default=default(d.batch_size), help="minibatch size")
    g.add_argument("--kl-weight", type=arg_nonneg_float, default=default(d.kl_weight),
                   help="weight of the KL term; 1 is the true ELBO")
    g.add_argument("--finetune-epochs", type=arg_nonneg_int, default=default(d.finetune_epochs),
                   help="epochs of training after the final reduction, masks frozen")
    g.add_argument("--warm-start-epochs", type=arg_nonneg_int, default=default(d.warm_start_epochs),
                   help="of the --epochs, how many first train the deterministic network (theta = 1, no KL) "
                        "before SVI; counted inside --epochs. None: a quarter of --epochs (the training recipe)")
    g.add_argument("--anneal-epochs", type=arg_nonneg_int, default=default(d.anneal_epochs),
                   help="of the --epochs, how many last train the weights at a tenth of --lr (the variational "
                        "parameters keep --guide-lr); fine-tuning goes on at that rate. None: a tenth of --epochs "
                        "(the training recipe); 0: a constant rate")
    g.add_argument("--seed", type=arg_nonneg_int, default=default(d.seed), help="random seed (data split and training)")
    g.add_argument("--device", default=default(d.device), help="cpu or cuda (cuda:N)")
    g.add_argument("--threads", type=arg_positive_int, default=default(d.threads),
                   help="CPU threads for torch; one is fastest for small networks (several threads on tiny "
                        "matrices mostly wait on each other) and reproducible; raise it for large conv nets")

    g.add_argument("--nproc", type=arg_positive_int, default=default(d.nproc),
                   help="data-parallel SVI on N processes of this machine (launches torchrun; gloo on CPU, NCCL "
                        "on CUDA); --batch-size is the global minibatch. Or run `torchrun --nproc-per-node N -m "
                        "bmrs_pyro run ...` yourself (several nodes: see the README's 'Scaling out')")

    g = p.add_argument_group("output")
    g.add_argument("--output", default=default(d.output), help="folder that holds run folders")
    g.add_argument("--name", default=default(d.name), help="run folder name; None: <data>-<model>-<method>-<time>")
    g.add_argument("--resume", metavar="RUN_DIR", default=default(None),
                   help="continue the run in RUN_DIR from its checkpoint.pt (after a crash, or with a larger "
                        "--epochs to train on); options come from its config.json and only --epochs, "
                        "--finetune-epochs, --device, --threads, --quiet and --no-report may be changed")
    g.add_argument("--no-report", dest="report", action="store_false", default=default(True),
                   help="skip figures and report.html")
    g.add_argument("--quiet", action="store_true", default=default(False),
                   help="no progress bars or stage lines (the summary table is still printed)")


#: Options --resume may change; the others must match the run's config.json.
_RESUME_MUTABLE = ("epochs", "finetune_epochs", "device", "threads", "quiet", "report")


def _explicit_options(argv: Sequence[str]) -> dict:
    """The ``run`` options given on the command line (not defaults)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} run", add_help=False)
    _add_run_arguments(parser, suppress=True)
    explicit, _ = parser.parse_known_args(list(argv))
    return vars(explicit)


def _run_config(args: argparse.Namespace, argv: Sequence[str]) -> tuple[RunConfig, Optional[Path]]:
    explicit = _explicit_options(argv)
    resume = explicit.pop("resume", None)
    if resume is None:
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields}
        if args.model != "mlp" and "hidden" in explicit:
            raise UsageError("--hidden applies to --model mlp only")
        return RunConfig(**values), None
    run_dir = Path(resume)
    saved = read_run_config(run_dir)
    clash = {k: v for k, v in explicit.items() if k not in _RESUME_MUTABLE and v != getattr(saved, k)}
    if "hidden" in clash and saved.hidden is not None and tuple(clash["hidden"]) == tuple(saved.hidden):
        clash.pop("hidden")
    if clash:
        shown = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(clash))
        raise UsageError(
            f"--resume continues the run saved in {run_dir}; {shown} differ(s) from its config.json. "
            f"Only {', '.join('--' + k.replace('_', '-') for k in _RESUME_MUTABLE[:4])}, --quiet and --no-report "
            "may change; start a new run for other settings"
        )
    updates = {k: v for k, v in explicit.items() if k in _RESUME_MUTABLE}
    # The folder may have been moved since: record where it is now.
    updates.update(output=str(run_dir.parent), name=run_dir.name)
    return dataclasses.replace(saved, **updates), run_dir


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``bmrs run``: train, prune, compact, write the run folder and print the summary."""
    config, resume_dir = _run_config(args, argv)
    # --nproc launches torchrun; under torchrun, ranks > 0 train without writing.
    if config.nproc == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and resume_dir is None:
        config = dataclasses.replace(config, nproc=int(os.environ["WORLD_SIZE"]))  # recorded for --resume
    code = run_hook(config, argv, resume_dir)
    if code is not None:
        return code
    log = (lambda _msg: None) if config.quiet else stderr_log(PROG)

    def report(run_dir: Path) -> None:  # runs while the run still holds its folder's lock
        log("building the report")
        build_report(run_dir)

    # config.json records the whole command, subcommand included, so it can be run again as written.
    run_dir, metrics, _ = execute(config, run_dir=resume_dir, resume=resume_dir is not None, log=log,
                                  progress=not config.quiet, argv=["run", *argv],
                                  finish=report if config.report else None)
    print(format_summary(metrics, run_dir))
    log(f"done in {metrics['seconds']:.1f} s: {run_dir}")
    return EXIT_OK


# ------------------------------------------------------------------------------ bmrs report

_REPORT_EPILOG = """\
example:
  bmrs report runs/digits-mlp-bmrs_n-20250101-120000
"""


def _add_report_arguments(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `bmrs run`")
    p.add_argument("--dpi", type=arg_positive_int, default=110, help="resolution of the figures")


def cmd_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``bmrs report RUN_DIR``: rebuild ``figures/`` and ``report.html`` from a run folder."""
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist; pass a folder written by `bmrs run`")
    missing = [f for f in (CONFIG_FILE, METRICS_FILE) if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished run folder: {' and '.join(missing)} missing "
                                "(a run writes metrics.json when it ends; resume it with `bmrs run --resume`)")
    ensure_writable(run_dir)
    if (run_dir / "figures").is_dir():
        ensure_writable(run_dir / "figures", run_dir)
    try:
        with RunLock(run_dir, "report"):
            out = build_report(run_dir, dpi=args.dpi)
    except (OSError, KeyError, TypeError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        # A corrupt netCDF or metrics of the wrong shape: say which folder, not a traceback.
        raise UsageError(f"{run_dir} is not a valid run folder ({type(err).__name__}: {err})") from None
    print(out)
    return EXIT_OK


# ------------------------------------------------------------------------------ bmrs compare

_COMPARE_DESCRIPTION = ("Run every chosen pruning method over K seeds on the same network and data (seed s draws "
               "the same train/validation split for every method) and write <output>/<name>/: curves.json, "
               "accuracy-against-compression figures, results.csv, results.md and widths.md. Prints the "
               "markdown table.")


_COMPARE_EPILOG = """\
examples:
  bmrs compare --quick                                    smoke test: every method, tiny budgets
  bmrs compare --data digits --model mlp --methods bmrs_n,snr,iap --seeds 5
  bmrs compare --data digits --model lenet5 --methods all --seeds 3 --epochs 30 --workers 2
"""


def _add_compare_arguments(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """Options of ``bmrs compare`` (budget options default to None: --quick or the built-in budget)."""
    d = CompareConfig.__dataclass_fields__
    # Options whose default depends on others (--quick, the model) are SUPPRESSed: absent from the
    # namespace unless given, and their help states the default itself.
    g = p.add_argument_group("what to compare")
    g.add_argument("--data", choices=DATASETS, default="digits", help="data set")
    g.add_argument("--model", choices=list(MODELS), default="mlp", help="network")
    g.add_argument("--hidden", default=argparse.SUPPRESS,
                   help="hidden widths of the mlp, comma-separated (default: 100,100)")
    g.add_argument("--activation", choices=("tanh", "relu", "gelu", "sigmoid"), default="tanh",
                   help="activation of the mlp")
    g.add_argument("--norm", choices=NORMS, default="none",
                   help="batch: a BatchNorm before every activation of the mlp or lenet5, for every method")
    g.add_argument("--methods", default="all", help=f"'all' or a comma-separated list of {', '.join(METHODS)}")
    g.add_argument("--seeds", type=int, default=d["seeds"].default, help="number of seeds (0..K-1)")
    g.add_argument("--subset", type=int, default=argparse.SUPPRESS,
                   help="keep this many training + validation examples (default: all; --quick: 400)")
    g = p.add_argument_group("budget (defaults: the built-in budget, or --quick's)")
    g.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                   help=f"training epochs before pruning ({d['epochs'].default})")
    g.add_argument("--finetune-epochs", type=int, default=argparse.SUPPRESS,
                   help=f"fine-tuning after each one-shot pruning ({d['finetune_epochs'].default})")
    g.add_argument("--finetune-lr-factor", type=float, default=argparse.SUPPRESS,
                   help="fine-tuning learning rates as a share of the training's "
                        f"({d['finetune_lr_factor'].default})")
    g.add_argument("--rounds", type=int, default=argparse.SUPPRESS,
                   help=f"iterative methods' rounds ({d['rounds'].default})")
    g.add_argument("--round-epochs", type=int, default=argparse.SUPPRESS,
                   help=f"retraining epochs per round ({d['round_epochs'].default})")
    g.add_argument("--fraction-step", type=float, default=argparse.SUPPRESS,
                   help=f"grid step of the swept curves ({d['fraction_step'].default})")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help=f"minibatch size ({d['batch_size'].default})")
    g.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help="learning rate of the weights (default: each method's own)")
    g.add_argument("--warm-start", type=float, default=argparse.SUPPRESS,
                   help="noise criteria: share of --epochs trained deterministically (theta = 1) before SVI, "
                        "counted inside --epochs; 0 = SVI from the start (default: 0.25, the training recipe)")
    g.add_argument("--anneal", type=float, default=argparse.SUPPRESS,
                   help="noise criteria: share of --epochs, at the end, that trains the weights at a tenth of "
                        "their rate; 0 = a constant rate (default: 0.1, the training recipe)")
    g.add_argument("--quick", action="store_true",
                   help=f"tiny budgets for a smoke test: {', '.join(f'{k}={v}' for k, v in QUICK_BUDGET.items())}")
    g = p.add_argument_group("running and output")
    g.add_argument("--workers", type=int, default=1, help="processes in parallel")
    g.add_argument("--threads", type=int, default=1, help="torch threads per process")
    g.add_argument("--output", default="compare", help="folder that holds comparison folders")
    g.add_argument("--name", default=argparse.SUPPRESS, help="comparison folder name (default: <data>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing comparison folder")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def compare_config_from_args(args: argparse.Namespace) -> CompareConfig:
    """A :class:`CompareConfig` from parsed ``bmrs compare`` arguments."""
    given = vars(args)
    budget = {k: given[k] for k in ("epochs", "finetune_epochs", "finetune_lr_factor", "rounds", "round_epochs", "fraction_step",
                                    "batch_size", "lr", "warm_start", "anneal") if k in given}
    values = dict(QUICK_BUDGET) if args.quick else {}
    subset = given.get("subset", values.pop("subset", None))
    values.pop("subset", None)
    data_options = {} if subset is None else {"subset": subset}
    values.update(budget)
    if "hidden" in given and args.model != "mlp":
        raise ValueError("--hidden applies to --model mlp only")
    hidden = parse_hidden(given["hidden"]) if "hidden" in given else (100, 100)
    return CompareConfig(data=args.data, model=args.model, methods=tuple(resolve_methods(args.methods)),
                         seeds=args.seeds, hidden=hidden, activation=args.activation, norm=args.norm, data_options=data_options,
                         output=args.output, name=given.get("name"), workers=args.workers, threads=args.threads,
                         overwrite=args.overwrite, **values)


def cmd_compare(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``bmrs compare``: run, write the folder, print the markdown table; returns the exit code."""
    config = compare_config_from_args(args)
    start = time.perf_counter()
    try:
        out = run_compare(config, progress=not args.quiet)
    except KeyboardInterrupt:
        folder = Path(config.output) / str(config.name)
        print(f"bmrs: interrupted; the finished (method, seed) pairs are kept in {folder / PARTIAL_FILE}: run the "
              f"same command with --name {config.name} to continue", file=sys.stderr)
        return 130
    print(format_markdown(out["rows"]))
    errors = [r for r in out["records"] if "error" in r]
    for r in errors:
        print(f"bmrs: {r['method']} seed {r['seed']} failed: {r['error']}", file=sys.stderr)
    if not args.quiet:
        print(f"bmrs: wrote {out['dir']} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 1 if errors else 0


# ------------------------------------------------------------------------------ registry

COMMANDS: list[Command] = [
    Command("run", "train, prune, compact and report one model",
            "Train a multiplicative-noise network by SVI, prune it (continuous BMRS by default), "
            "compact it and write runs/<name>/ (config, metrics, checkpoint, compacted model, "
            "inference data, figures, report.html). Prints a before/after summary table.",
            _RUN_EPILOG, _add_run_arguments, cmd_run),
    Command("report", "rebuild the figures and report.html of a run folder",
            "Render figures/*.png and a self-contained report.html from a run folder's config.json, "
            "metrics.json and inference_data.nc.",
            _REPORT_EPILOG, _add_report_arguments, cmd_report),
    Command("compare", "run every pruning method over seeds into curves and a table",
            _COMPARE_DESCRIPTION, _COMPARE_EPILOG, _add_compare_arguments, cmd_compare),
]

_MAIN_EPILOG = """\
examples:
  bmrs run                      train and prune the default MLP on digits (about 20 s on one CPU core)
  bmrs run --help               every option of a run, with defaults
  bmrs report runs/<name>       rebuild the report of a run
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``bmrs`` parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter, epilog=_MAIN_EPILOG,
        description="Bayesian structured pruning with Pyro and exact Bayesian model reduction (BMRS).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           epilog=command.epilog, formatter_class=_Formatter)
        command.add_arguments(p, False)
        p.set_defaults(func=command.handler)
    return parser


#: What an interrupted command leaves and how to go on (files are written atomically, so none is half-written).
_INTERRUPTED = {
    "run": "interrupted; a run can be continued with `bmrs run --resume <run folder>`",
    "report": "interrupted; files already in the run folder are unchanged or complete: run `bmrs report` again",
}


def _permission_message(err: PermissionError) -> str:
    """'permission denied' with the path, whether the error carries a filename or a message."""
    if err.filename:
        return f"permission denied: {err.filename}; fix its permissions (e.g. chmod u+rw) or pick another folder"
    text = str(err)
    return text if "ermission denied" in text else f"permission denied: {text}"


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``bmrs`` console script; returns the exit code (never raises SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and argparse's own usage errors
        return int(stop.code or 0) if isinstance(stop.code, int) or stop.code is None else EXIT_USAGE
    handler = args.func
    sub_argv = argv[argv.index(args.command) + 1:] if args.command in argv else argv
    try:
        return handler(args, sub_argv)
    except TrainingDivergedError as err:
        _error(f"training diverged: {err}")
        return EXIT_FAILURE
    except PermissionError as err:
        _error(_permission_message(err))
        return EXIT_USAGE
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError) as err:
        _error(str(err))
        return EXIT_USAGE
    except OSError as err:  # e.g. the disk filled up while writing the run folder
        _error(f"{err}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error(_INTERRUPTED.get(args.command, "interrupted"))
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
