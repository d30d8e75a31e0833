"""``omnic tune MODEL --trials N --time-s S``: tune a model's new tasks into the device's database
(``omnic compile`` reuses them), and print what was tuned."""
from __future__ import annotations

import argparse
from typing import Any

from omnic.cli.common import add_model_args, deployment_from, emit, load_model_spec, parse_shape
from omnic.core.errors import TuningError


def register_cli(subparsers: Any) -> None:
    """Add the ``tune`` command."""
    p = subparsers.add_parser("tune", help="tune a model's new tasks into the device's persistent database")
    add_model_args(p)
    p.add_argument("--time-s", type=float, default=None, help="wall-clock budget (tasks heaviest first)")
    # None: TuningConfig's default (read when the command runs, so `omnic --help` needs no TVM)
    p.add_argument("--per-iter", type=int, default=None, help="trials per batch")
    p.add_argument("--population", type=int, default=None, help="evolutionary search population")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    # lazy: the engine and the tuner import TVM (seconds), which no other command line path needs
    from omnic import engine
    from omnic.compile.tuning import TuningConfig, using

    if not args.trials and not args.time_s:
        raise TuningError("give a budget: --trials N and/or --time-s SECONDS")
    model, x = load_model_spec(args.model, parse_shape(args.input_shape))
    deployment = deployment_from(args).replace(tuning_time_s=args.time_s)
    settings = {"trials_per_iter": args.per_iter, "population_size": args.population}
    with using(TuningConfig(**{k: v for k, v in settings.items() if v is not None})):
        dm = engine.compile(model, deployment, x)
    rep = dm.report["tuning"]
    text = (f"{rep.get('tasks', 0)} tasks: {rep.get('tasks_in_database', 0)} already in the database, "
            f"{rep.get('tasks_tuned', 0)} tuned now with {rep['trials']} trials in {rep.get('wall_s', 0)} s"
            f"{' (time budget spent)' if rep.get('stopped_by_time') else ''}; estimated kernel time "
            f"{rep.get('estimated_model_ms')} ms; database {rep['database']}")
    emit(args, rep, text)
    return 0
