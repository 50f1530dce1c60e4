"""`gemma4-agent parse-action`: debug an action file. One JSON-encoded string per line on stdin (a
line that is not a JSON string is taken as the raw text); one JSON object per line on stdout:
{"ok", "action", "twist" {linear_x, angular_z}, "error", "reason"}. The twist is clamped to the
safety limits (no acceleration limit: there is no time here)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .parser import ActionParser
from .safety import action_to_twist, clamp_twist
from .spec import SpecError, load_action_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--actions", default=None,
                        help="action file (default: the package's config/actions.yaml)")
    parser.add_argument("--fallback", choices=["stop", "hold_last"], default=None,
                        help="override the file's fallback policy")
    parser.add_argument("--summary", action="store_true", help="print the reason counts to stderr at the end")
    parser.add_argument("--print-grammar", action="store_true", help="print the EBNF grammar and exit")
    parser.add_argument("--print-schema", action="store_true", help="print the JSON schema and exit")


def run(args: argparse.Namespace) -> int:
    try:
        spec = load_action_spec(args.actions)
    except (SpecError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_grammar:
        sys.stdout.write(spec.ebnf())
        return 0
    if args.print_schema:
        print(json.dumps(spec.json_schema(), indent=2))
        return 0
    logging.getLogger("gemma4_agent.actions").addHandler(logging.NullHandler())  # errors go to stdout
    parser = ActionParser(spec, fallback=args.fallback)
    for raw in sys.stdin:
        line = raw.rstrip("\r\n")
        try:
            text = json.loads(line)
            if not isinstance(text, str):
                text = line
        except ValueError:
            text = line
        result = parser.parse(text)
        twist = clamp_twist(action_to_twist(result.action, spec), spec.safety)
        out = {"ok": result.ok, "action": result.action, "twist": twist, "error": result.error,
               "reason": result.reason}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    if args.summary:
        print(json.dumps(parser.stats.as_dict()), file=sys.stderr)
    return 0
