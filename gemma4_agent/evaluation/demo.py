"""`gemma4-agent demo`: the main job on the embedded default, end to end over ROS 2.

1. start the real node (`python -m gemma4_agent.ros.node`) on the bundled demo engine, on a
   private ROS_DOMAIN_ID, and wait until its /diagnostics says it is active;
2. play the bundled sample bag (`data/sample_bag`, a held-out synthetic episode) into it at
   recorded timing, recording `/cmd_vel`, `/gemma4_agent/action` and `/diagnostics`;
3. stop the node (SIGINT: shutdown transition, zero Twist, exit 0);
4. evaluate the node's commands against the bag's expert commands and write
   `out/demo/report.{json,md}` (+ plots, the recorded bag and the node's log).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..bagio import BagError
from .metrics import agreement_text

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("gemma4_agent"))
    except Exception:  # noqa: BLE001 -- not installed / no ament index
        return None


def default_sample_bag() -> Path:
    """The bundled sample bag: the source tree's data/sample_bag, or the installed share/ copy."""
    local = PACKAGE_ROOT / "data" / "sample_bag"
    if local.is_dir():
        return local
    share = _share_dir()
    return share / "data" / "sample_bag" if share is not None and (share / "data" / "sample_bag").is_dir() else local


def _domain_id() -> int:
    return 100 + (os.getpid() % 100)


def _engine_image_tokens(engine: Path) -> int | None:
    try:
        return int(json.loads((engine / "agent.json").read_text())["image_tokens"])
    except (OSError, ValueError, KeyError):
        return None


def wait_for_active(node, timeout_s: float, proc: subprocess.Popen) -> dict[str, str]:
    """Spin `node` until the agent node's /diagnostics reports lifecycle_state active."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray

    seen: dict[str, Any] = {}

    def on_diag(msg) -> None:
        for status in msg.status:
            if status.name.endswith(": inference"):
                seen["values"] = {kv.key: kv.value for kv in status.values}
                seen["message"] = status.message
                seen["level"] = status.level

    sub = node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.2)
            if seen.get("values", {}).get("lifecycle_state") == "active":
                return seen["values"]
            if proc.poll() is not None:
                raise RuntimeError(f"the node exited with code {proc.returncode} before becoming active")
            if seen.get("message", "").startswith("configure failed"):
                raise RuntimeError(f"the node could not start: {seen['message']}")
    finally:
        node.destroy_subscription(sub)
    raise RuntimeError(f"the node did not become active within {timeout_s:.0f} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", type=Path, default=None, help="engine folder (default: the bundled demo engine)")
    parser.add_argument("--bag", type=Path, default=None, help="bag to play (default: the bundled sample bag)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    parser.add_argument("--duration-s", type=float, default=None, help="play only this many seconds of the bag")
    parser.add_argument("--budget-ms", type=float, default=None, help="node latency budget (default: the node's)")
    parser.add_argument("--start-timeout-s", type=float, default=120.0)
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID (default: a private one)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..agent import default_engine_path

    engine = Path(args.engine or default_engine_path()).resolve()
    bag = Path(args.bag or default_sample_bag()).resolve()
    if not (engine / "manifest.json").exists():
        print(f"error: no engine at {engine} (the demo engine ships in engines/demo; "
              "`gemma4-agent train-demo` rebuilds it)", file=sys.stderr)
        return 2
    if not bag.exists():
        print(f"error: no sample bag at {bag}", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "recorded_bag"
    domain = args.domain_id if args.domain_id is not None else _domain_id()
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    try:
        from ..bagio import bag_topics
        topics = bag_topics(bag)
    except BagError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    compressed = any(t == "sensor_msgs/msg/CompressedImage" for t in topics.values())
    cmd = [sys.executable, "-m", "gemma4_agent.ros.node", "--ros-args", "-p", f"engine:={engine}",
           "-p", f"image_transport:={'compressed' if compressed else 'raw'}",
           "-r", "image:=/camera/image_raw", "-r", "image/compressed:=/camera/image_raw/compressed"]
    tokens = _engine_image_tokens(engine)
    if tokens:
        cmd += ["-p", f"image_tokens:={tokens}"]
    if args.budget_ms is not None:
        cmd += ["-p", f"budget_ms:={args.budget_ms}"]
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = out / "node.log"
    print(f"demo: node on engine {engine.name} ({engine}), sample bag {bag}, ROS_DOMAIN_ID={domain}")
    import rclpy

    from .play import play
    from .recorded import evaluate_recording

    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        rclpy.init()
        try:
            waiter = rclpy.create_node("gemma4_agent_demo")
            try:
                wait_for_active(waiter, args.start_timeout_s, proc)
            finally:
                waiter.destroy_node()
            print(f"demo: node active after {time.monotonic() - started:.1f} s; playing the bag")
            result = play(bag, rate=args.rate, record=recorded, overwrite=True, init_ros=False,
                          progress=not args.no_progress, tail_s=1.0,
                          duration_s=args.duration_s)
        except (RuntimeError, BagError) as err:
            print(f"error: {err} (node log: {log_path})", file=sys.stderr)
            return 2
        finally:
            rclpy.try_shutdown()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    node_rc = proc.returncode
    print(f"demo: played {result.frames} frames; node exited with code {node_rc}; recorded "
          + ", ".join(f"{t} {n}" for t, n in result.recorded.items()))
    summary, records = evaluate_recording(recorded, bag)
    from .replay import engine_name, machine_info
    from .report import write_report

    report: dict[str, Any] = {
        "kind": "demo", "engine": str(engine), "engine_name": engine.name, "bag": str(bag),
        "recorded_bag": str(recorded), "node_exit_code": node_rc, "ros_domain_id": domain,
        "played_frames": result.frames, "rate": args.rate, "machine": machine_info(), **summary,
    }
    try:
        report["engine_name"] = json.loads((engine / "manifest.json").read_text()).get("name", engine.name)
    except (OSError, ValueError):
        pass
    header = [f"- engine: `{report['engine_name']}` ({engine}); node `gemma4_agent` over ROS 2 (domain {domain})",
              f"- bag: {bag} played at {args.rate:g}x; node outputs recorded to {recorded}",
              f"- machine: {report['machine']['cpu']} ({report['machine']['cores']} cores), {report['machine']['date']}"]
    diag = summary.get("node_diagnostics") or {}
    extra = []
    if diag:
        keys = ["frames_received", "frames_processed", "commands_ok", "fallbacks", "deadline_misses",
                "dropped_replaced", "dropped_stale", "bad_images", "watchdog_stops"]
        extra = ["## Node diagnostics (last report)", "", "| key | value |", "|---|---|"]
        extra += [f"| {k} | {diag[k]} |" for k in keys if k in diag] + [""]
    paths = write_report(out, report, records, "Demo: node + sample bag over ROS 2", header,
                         {"sample_bag": records}, extra)
    s = summary
    lat = s["latency_ms"]
    print(f"demo: {s['frames']} frames played, {s['processed']} commanded by the node, {s['dropped']} dropped, "
          f"{s['deadline_misses']} deadline misses, {s['fallbacks']} fallbacks")
    print(f"demo: vs expert: {agreement_text(s)}")
    print(f"demo: latency capture->command p50/p90/p99 {lat['p50']}/{lat['p90']}/{lat['p99']} ms")
    print(f"demo: report {paths['md']}")
    return 0 if node_rc == 0 and s["processed"] > 0 else 1
