"""The `upcycle` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from upcycle.errors import ConfigError, UpcycleError

logger = logging.getLogger("upcycle")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="DIR",
        help="data root holding one folder per task; used when the config sets no data.root, "
        "and takes precedence over the UPCYCLE_DATA environment variable",
    )
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")


def _add_run_dir(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    if optional:
        # merge and select also take --experts FILE --out RUN in place of RUN.
        parser.add_argument("run_dir", metavar="RUN", nargs="?", help="an existing run directory")
    else:
        parser.add_argument("run_dir", metavar="RUN", help="an existing run directory")
    _add_common(parser)


def _add_executor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor", choices=["local", "ray"],
        help="run fine-tuning and merge jobs in this process (local) or as Ray tasks (ray); "
        "overrides the config's executor key",
    )
    parser.add_argument(
        "--ray-address", metavar="ADDRESS",
        help="connect to this running Ray cluster, e.g. ray://head:10001 or auto, instead "
        "of starting a local Ray instance; implies --executor ray",
    )


def _add_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--export", metavar="METHOD",
        help="in place of the sweep, merge the full fine-tuning checkpoints of one step with "
        "METHOD into the safetensors file --out, reading one tensor at a time",
    )
    parser.add_argument("--step", type=int, help="checkpoint step to export (with --export)")
    parser.add_argument("--seed", type=int, help="seed to export (default: the run's first)")
    parser.add_argument(
        "--coefficient", type=float,
        help="scaling coefficient of the export (default: the one the merge stage chose)",
    )
    parser.add_argument(
        "--out", metavar="FILE",
        help="output safetensors file (with --export), or the run directory to create "
        "(with --experts)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Fine-tune experts along a trajectory, merge them or upcycle them into "
        "MoE layers at every checkpoint, and see how training length changes the result.",
    )
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every stage the config enables",
                              description="Run every stage the config enables, resuming "
                              "completed work in an existing run directory.")
    run.add_argument("config", metavar="CONFIG", help="YAML run config")
    run.add_argument("--out", metavar="RUN",
                     help="run directory (default: runs/<config name>)")
    run.add_argument("--force", action="store_true",
                     help="recompute a run directory whose config or data changed")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.steps=100 (repeatable)")
    _add_common(run)
    _add_executor(run)

    for name, text in (
        ("finetune", "fine-tune the experts of an existing run directory"),
        ("evaluate", "evaluate the zero-shot model and every stored expert checkpoint"),
        ("merge", "merge the experts at every checkpoint step and evaluate the merges"),
    ):
        stage_parser = commands.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + "."
        )
        _add_run_dir(stage_parser, optional=name == "merge")
        if name in ("finetune", "merge"):
            _add_executor(stage_parser)
        if name == "merge":
            _add_export(stage_parser)

    moe = commands.add_parser(
        "moe", help="upcycle the LoRA adapters of a run into MoE layers and train the routers",
        description="Upcycle the LoRA adapters of every checkpoint step into MoE layers, train "
        "each router on the multi-task mixture and evaluate it.",
    )
    _add_run_dir(moe)
    analyze = commands.add_parser(
        "analyze", help="difficulty, forgetting by merging and task-vector interference",
        description="Fill results/forgetting.csv and results/interference.csv for a run.",
    )
    _add_run_dir(analyze)
    select = commands.add_parser(
        "select", help="apply stopping rules and merge-aware selection to saved trajectories",
        description="Choose one checkpoint step per task with a stopping rule or merge-aware "
        "search, merge those checkpoints and write results/selection.csv.",
    )
    _add_run_dir(select, optional=True)
    from upcycle.selection.external import add_experts_argument
    from upcycle.selection.stage import add_select_arguments

    add_select_arguments(select)
    add_experts_argument(select)
    select.add_argument("--out", metavar="RUN", help="run directory to create (with --experts)")
    add_experts_argument(commands.choices["merge"])
    report = commands.add_parser(
        "report", help="write RUN/report/index.html with the run's figures",
        description="Write RUN/report/index.html, one self-contained page, and the figures "
        "as PNG and SVG files beside it.",
    )
    _add_run_dir(report)

    data = commands.add_parser("data", help="build a benchmark suite in the task folder format")
    data_commands = data.add_subparsers(dest="suite", required=True, metavar="SUITE")
    textsuite = data_commands.add_parser(
        "textsuite", help="download the eight-task text suite from the Hugging Face Hub",
        description="Download SST-2, TREC, Subj, CR, TweetEval emotion/irony/hate and AG News "
        "from the Hugging Face Hub and write them as task folders. Needs hub access.",
    )
    textsuite.add_argument("out_dir", metavar="DIR", help="folder to write the tasks into")
    textsuite.add_argument("--tasks", nargs="+", metavar="TASK", help="build only these tasks")
    textsuite.add_argument("--seed", type=int, default=0,
                           help="seed of the splits cut from train (default: 0)")
    return parser


def load_run_config(run_dir: str):
    from upcycle.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory: {path} not found. Start one with "
            "`upcycle run CONFIG --out RUN`"
        )
    return load_config(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return dispatch(args)
    except UpcycleError as error:
        print(f"upcycle: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("upcycle: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def dispatch(args: argparse.Namespace) -> int:
    from upcycle import pipeline
    from upcycle.workspace import Workspace

    progress = not getattr(args, "quiet", False)
    if not progress:
        # transformers draws its own bar while it loads weights.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if args.command == "run":
        from upcycle.config import load_config

        config = apply_executor_options(load_config(args.config, args.overrides), args)
        out = args.out or str(Path("runs") / config.name)
        pipeline.run_all(config, out, data_root=args.data, force=args.force, progress=progress)
        logger.info("run directory: %s (summary in %s)", out, Path(out) / "summary.md")
        return 0
    if args.command == "data":
        from upcycle.data.textsuite import build_textsuite

        build_textsuite(Path(args.out_dir), tasks=args.tasks, seed=args.seed)
        return 0
    if args.command == "merge" and args.export is None:
        export_options = (
            ("--step", args.step),
            ("--seed", args.seed),
            ("--coefficient", args.coefficient),
        )
        export_only = [option for option, value in export_options if value is not None]
        if export_only:
            raise ConfigError(
                f"{', '.join(export_only)} apply only with --export METHOD. Add --export METHOD "
                "to write one merged task vector, or leave them out to run the merge stage"
            )
    if args.command in ("merge", "select"):
        from upcycle.selection.external import run_dir_from_arguments

        args.run_dir = run_dir_from_arguments(args)
    config = apply_executor_options(load_run_config(args.run_dir), args)
    ws = Workspace(config, args.run_dir, data_root=args.data)
    if args.command == "merge" and args.export is not None:
        return export_merge(ws, args)
    if args.command == "report":
        pipeline.run_report(ws)
        return 0
    stages = {
        "finetune": lambda: pipeline.run_finetune(ws, progress=progress),
        "evaluate": lambda: pipeline.run_evaluate(ws),
        "merge": lambda: pipeline.run_merge(ws),
        "moe": lambda: pipeline.run_moe(ws, progress=progress),
        "analyze": lambda: pipeline.run_analyze(ws),
        "select": lambda: pipeline.run_select(ws, **select_options(args)),
    }
    stages[args.command]()
    pipeline.run_summary(ws)
    return 0


def apply_executor_options(config, args: argparse.Namespace):
    """Return `config` with the executor and Ray address of --executor and --ray-address."""
    executor = getattr(args, "executor", None)
    address = getattr(args, "ray_address", None)
    if address is not None:
        if executor == "local":
            raise ConfigError("--ray-address needs the ray executor; drop --executor local")
        executor = "ray"
        config.ray.address = address
    if executor is not None:
        config.executor = executor
    return config


def export_merge(ws, args: argparse.Namespace) -> int:
    from upcycle.pipeline import export_merge as export

    missing = [option for option, value in (("--step", args.step), ("--out", args.out))
               if value is None]
    if missing:
        raise ConfigError(f"--export needs {' and '.join(missing)}")
    path = export(ws, method=args.export, step=args.step, out=args.out, seed=args.seed,
                  coefficient=args.coefficient)
    logger.info("merged task vector written to %s", path)
    return 0


def select_options(args: argparse.Namespace) -> dict:
    from upcycle.selection.stage import options_from_arguments

    return options_from_arguments(args)


if __name__ == "__main__":
    sys.exit(main())
