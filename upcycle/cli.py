"""The `upcycle` command line.

Each command is a small function registered in `COMMANDS` with its argument setup. Every
user-fixable problem raises `UpcycleError`; `main` prints its one sentence to stderr and exits with
code 2, with a traceback only under `--debug`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from upcycle import __version__
from upcycle.errors import UpcycleError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint folder (HF dense or upcycle native)")
    parser.add_argument("--no-tensors", action="store_true", help="print the summary only, not every tensor")


def _run_inspect(args: argparse.Namespace) -> int:
    from upcycle.inspect import inspect_checkpoint

    inspect_checkpoint(args.path, show_tensors=not args.no_tensors)
    return 0


def _configure_init(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file with ModelConfig keys (see README, 'Model config')")
    parser.add_argument("out_dir", help="the native checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument(
        "--std", type=float, default=0.02, help="std of the normal initialisation (default 0.02)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def _run_init(args: argparse.Namespace) -> int:
    from upcycle.checkpoint.atomic import check_target, write_refusal
    from upcycle.checkpoint.native import save_native
    from upcycle.model.config import ModelConfig
    from upcycle.model.init import init_weights
    from upcycle.model.transformer import Transformer
    from upcycle.yaml_config import load_yaml_model

    if not 0 <= args.std < float("inf"):  # also refuses NaN
        raise UpcycleError(f"--std must be a finite number ≥ 0, got {args.std}; pass e.g. --std 0.02")
    config = load_yaml_model(args.config, ModelConfig)
    check_target(Path(args.out_dir), args.overwrite)
    model = init_weights(Transformer(config), std=args.std, seed=args.seed)
    try:
        save_native(model, args.out_dir, overwrite=args.overwrite)
    except OSError as error:  # a full disk, a filesystem without renames: one sentence
        refusal = write_refusal(error, args.out_dir)
        if refusal is None:
            raise
        raise refusal from error
    print(f"wrote a freshly initialised model to {args.out_dir}")
    return 0


def _configure_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a convert YAML (see README, 'Convert config')")
    parser.add_argument("out_dir", help="the checkpoint folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_convert(args: argparse.Namespace) -> int:
    from upcycle.conversion import convert

    out = convert(args.config, args.out_dir, overwrite=args.overwrite, quiet=args.quiet)
    print(f"wrote {out}")
    return 0


def _configure_recipes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="show one recipe's parameters in full")


def _run_recipes(args: argparse.Namespace) -> int:
    from upcycle.recipes.describe import describe_recipes

    describe_recipes(args.name)
    return 0


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a train YAML (see README, 'Train config')")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in the output"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no status lines")


def _run_train(args: argparse.Namespace) -> int:
    from upcycle.train import TrainConfig, train
    from upcycle.yaml_config import load_yaml_model

    result = train(load_yaml_model(args.config, TrainConfig), resume=args.resume, quiet=args.quiet)
    if result.final_dir is not None:
        print(f"trained {result.steps} steps ({result.tokens:,} tokens); wrote {result.final_dir}")
    return 0


def _configure_data(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare", help="tokenise text/JSONL/Parquet domains into token shards and a manifest"
    )
    prepare.add_argument("config", help="a data YAML (see README, 'Data config')")
    prepare.add_argument("out_dir", help="the prepared data folder to create")
    prepare.add_argument("--force", action="store_true", help="re-tokenise even if OUT_DIR is up to date")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
    )


def _run_data(args: argparse.Namespace) -> int:
    from upcycle.data import DataConfig, prepare_data
    from upcycle.yaml_config import load_yaml_model

    manifest = prepare_data(
        load_yaml_model(args.config, DataConfig), args.out_dir, quiet=args.quiet, force=args.force
    )
    tokens = {name: domain.train.tokens + domain.heldout.tokens for name, domain in manifest.domains.items()}
    print(f"prepared {sum(tokens.values()):,} tokens in {len(tokens)} domain(s) into {args.out_dir}")
    return 0


def _add_heldout_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the held-out tokens, shared by `eval` and `analyze routing`."""
    parser.add_argument("--data", required=True, help="a prepared data folder (holds manifest.json)")
    parser.add_argument("--domains", help="comma-separated domains to use (default: all)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--max-sequences", type=int, help="use only the first N windows of each domain")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _domain_list(text: str | None) -> list[str] | None:
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="checkpoint folders (native, HF, or a BTM folder)")
    _add_heldout_options(parser)
    parser.add_argument("--out", help="folder for eval.json and eval.md (default: print only)")
    parser.add_argument(
        "--no-tokenizer-check", action="store_true", help="do not compare model and data tokenizers"
    )


def _run_eval(args: argparse.Namespace) -> int:
    from upcycle.eval.perplexity import evaluate_perplexity, write_perplexity_report

    report = evaluate_perplexity(
        args.models,
        args.data,
        domains=_domain_list(args.domains),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_sequences=args.max_sequences,
        device=args.device,
        precision=args.precision,
        check_tokenizer=not args.no_tokenizer_check,
        quiet=args.quiet,
    )
    print(report.markdown())
    if args.out:
        json_path, md_path = write_perplexity_report(report, args.out)
        print(f"wrote {json_path} and {md_path}")
    return 0


def _configure_btm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="the BTM folder to create (btm.json + tf-idf statistics)")
    parser.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="DOMAIN=CHECKPOINT",
        help="the expert trained on DOMAIN (a domain of --data); repeat once per domain",
    )
    parser.add_argument("--data", required=True, help="the prepared data the experts were trained on")
    parser.add_argument("--top-k", type=int, default=2, help="experts mixed per position (default 2)")
    parser.add_argument("--temperature", type=float, default=0.1, help="softmax temperature τ (default 0.1)")
    parser.add_argument("--chunk-len", type=int, default=256, help="tokens per tf-idf chunk (default 256)")
    parser.add_argument(
        "--chunks-per-domain", type=int, default=1024, help="tf-idf chunks read per domain (default 1024)"
    )
    parser.add_argument("--no-tokenizer-check", action="store_true", help="do not compare tokenizers")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def _run_btm(args: argparse.Namespace) -> int:
    from upcycle.eval.btm import build_btm

    experts: dict[str, str] = {}
    for pair in args.expert:
        domain, sep, path = pair.partition("=")
        if not sep or not domain or not path:
            raise UpcycleError(
                f"--expert {pair!r} is not DOMAIN=CHECKPOINT; write e.g. --expert code=out/code"
            )
        if domain in experts:
            raise UpcycleError(f"domain {domain!r} has two --expert entries; give one expert per domain")
        experts[domain] = path
    out = build_btm(
        experts,
        args.data,
        args.out_dir,
        top_k=args.top_k,
        temperature=args.temperature,
        chunk_len=args.chunk_len,
        chunks_per_domain=args.chunks_per_domain,
        check_tokenizer=not args.no_tokenizer_check,
        overwrite=args.overwrite,
    )
    print(f"wrote the BTM ensemble {out}; evaluate it with `upcycle eval {args.out_dir} --data {args.data}`")
    return 0


def _configure_analyze(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    routing = what.add_parser(
        "routing", help="per-layer routing of each domain's tokens: JSON, Markdown and PNG heatmaps"
    )
    routing.add_argument("model", help="an MoE or BAM checkpoint folder (native or HF MoE)")
    _add_heldout_options(routing)
    routing.add_argument("--out", required=True, help="folder for routing.json, routing.md and the PNGs")
    routing.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
    )


def _run_analyze(args: argparse.Namespace) -> int:
    from upcycle.eval.routing import analyze_routing, write_routing_report

    report = analyze_routing(
        args.model,
        args.data,
        domains=_domain_list(args.domains),
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_sequences=args.max_sequences,
        device=args.device,
        precision=args.precision,
        quiet=args.quiet,
    )
    print(report.markdown())
    written = write_routing_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _configure_plot(parser: argparse.ArgumentParser) -> None:
    what = parser.add_subparsers(dest="plot", metavar="PLOT", required=True)
    losses = what.add_parser("losses", help="training curves of several runs in one PNG")
    losses.add_argument("runs", nargs="+", help="metrics JSONL files (one JSON object per line)")
    losses.add_argument("--out", required=True, help="the PNG file to write")
    losses.add_argument("--key", default="loss", help="the metric to plot (default loss)")
    losses.add_argument("--x", default="step", help="the x-axis key (default step)")
    losses.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) (default 0: raw)")
    losses.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    losses.add_argument("--label", action="append", help="a legend label per run, in order")
    losses.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
    )


def _run_plot(args: argparse.Namespace) -> int:
    from upcycle.eval.plots import load_run, plot_losses

    labels = args.label or []
    if labels and len(labels) != len(args.runs):
        raise UpcycleError(f"got {len(labels)} --label for {len(args.runs)} runs; give one per run or none")
    runs = [
        load_run(path, key=args.key, x_key=args.x, label=labels[i] if labels else None)
        for i, path in enumerate(args.runs)
    ]
    out = plot_losses(runs, args.out, key=args.key, x_key=args.x, smooth=args.smooth, log_y=args.log_y)
    print(f"wrote {out}")
    return 0


def _configure_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="the report folder (report.md + figures/)")
    parser.add_argument("--eval", nargs="+", default=[], help="eval.json files from `upcycle eval`")
    parser.add_argument("--routing", nargs="+", default=[], help="routing.json files from `upcycle analyze`")
    parser.add_argument("--losses", nargs="+", default=[], help="training metrics JSONL files")
    parser.add_argument("--title", default="upcycle report", help="the report's title")


def _run_report(args: argparse.Namespace) -> int:
    from upcycle.eval.report import build_report

    path = build_report(
        args.out_dir,
        eval_files=args.eval,
        routing_files=args.routing,
        loss_files=args.losses,
        title=args.title,
    )
    print(f"wrote {path}")
    return 0


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a pipeline YAML (see README, 'Pipeline config')")
    parser.add_argument("--quiet", action="store_true", help="no stage messages or progress bars")


def _run_run(args: argparse.Namespace) -> int:
    from upcycle.pipeline import run_pipeline

    report = run_pipeline(args.config, quiet=args.quiet)
    if report is not None:
        print(f"report: {report}")
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--quiet", action="store_true", help="no stage messages or progress bars")


def _run_demo(args: argparse.Namespace) -> int:
    from upcycle.pipeline.demo import run_demo

    return run_demo(args.out, quiet=args.quiet)


COMMANDS: list[Command] = [
    Command(
        "demo", "the whole workflow on a built-in corpus, a few minutes on a CPU", _configure_demo, _run_demo
    ),
    Command(
        "run",
        "run a pipeline YAML: seed, branches, mixes, finetunes, evaluation, report",
        _configure_run,
        _run_run,
    ),
    Command(
        "convert",
        "turn dense checkpoints into an MoE checkpoint with a recipe",
        _configure_convert,
        _run_convert,
    ),
    Command(
        "train", "train a dense, MoE or BAM model from a train config YAML", _configure_train, _run_train
    ),
    Command(
        "data", "prepare training data: `upcycle data prepare DATA.yaml OUT_DIR`", _configure_data, _run_data
    ),
    Command("recipes", "list the recipes with their papers and parameters", _configure_recipes, _run_recipes),
    Command(
        "init", "create a freshly initialised model from a model config YAML", _configure_init, _run_init
    ),
    Command(
        "inspect",
        "print a checkpoint's architecture, parameter count and tensors",
        _configure_inspect,
        _run_inspect,
    ),
    Command(
        "eval",
        "per-domain held-out perplexity of one or more models, side by side",
        _configure_eval,
        _run_eval,
    ),
    Command(
        "btm", "build a BTM ensemble of domain experts with a tf-idf domain router", _configure_btm, _run_btm
    ),
    Command(
        "analyze",
        "analyse a model on domain data (analyze routing MODEL --data DIR)",
        _configure_analyze,
        _run_analyze,
    ),
    Command("plot", "draw figures (plot losses RUN.jsonl ... --out PNG)", _configure_plot, _run_plot),
    Command(
        "report", "a Markdown report of eval, routing and training files", _configure_report, _run_report
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Turn dense language models into Mixture-of-Experts models and train them.",
    )
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        sub.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks"
        )
        command.configure(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UpcycleError as error:
        if args.debug:
            raise
        print(f"upcycle: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("upcycle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
