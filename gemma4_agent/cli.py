"""`gemma4-agent` command line: one subcommand per module, imported only when used.

Each module named here defines `add_arguments(parser)` and `run(args) -> int`. An error a user can
cause (a bad path, a malformed file, a wrong value) ends the command with one `error:` line and exit
code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "inspect": ("gemma4_agent.model.inspect_cli", "Print a checkpoint's or config's summary and weight bytes."),
    "bench": ("gemma4_agent.engine.bench", "Time the streaming engine (per-frame latency, decode ms/token)."),
    "quantize": ("gemma4_agent.quant.quantize_cli", "Quantize a checkpoint's linear layers to INT4."),
    "build-engine": ("gemma4_agent.engines.build_cli", "Build an engine folder (onnxruntime or TensorRT)."),
    "verify-engine": ("gemma4_agent.engines.verify_cli", "Compare an engine against the torch model."),
    "parse-action": ("gemma4_agent.actions.cli", "Parse action strings (JSON lines on stdin)."),
    "generate-bags": ("gemma4_agent.sim.generate_bags", "Write synthetic-world episodes as ROS 2 bags."),
    "train-demo": ("gemma4_agent.demo.train", "Train the embedded demo model on the synthetic world."),
    "replay": ("gemma4_agent.evaluation.replay", "Replay a bag through the agent core and write a report."),
    "play": ("gemma4_agent.evaluation.play", "Republish a bag over ROS 2 and record the node's outputs."),
    "sim": ("gemma4_agent.evaluation.closed_loop", "Run the agent closed-loop in the synthetic world."),
    "demo": ("gemma4_agent.evaluation.demo", "Run the node on the demo engine, play the sample bag, print the evaluation."),
}


def positive(kind: type = float):
    """argparse type: a number > 0 (a frame count, a rate, a budget): 0 or less is refused before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value > 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage and exits
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"gemma4-agent {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from pydantic import ValidationError

    from .errors import one_line

    try:
        return int(module.run(args) or 0)
    except (ValidationError, OSError) as err:
        # what a subcommand did not catch itself: a value refused by one of the pydantic configs at
        # the edge (AgentConfig, SessionConfig, ...) or a path that cannot be read or written
        print(f"gemma4-agent {name}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
