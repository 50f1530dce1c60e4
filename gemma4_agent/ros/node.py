"""The gemma4_agent lifecycle node: camera frames in, safe `cmd_vel` out, over the agent core.

Threads:
- the executor thread (SingleThreadedExecutor): subscriptions, timers, parameter and lifecycle
  services. Their callbacks are tiny: the image callback only drops the message's bytes into a
  one-slot buffer (latest wins), so parameter get/set and lifecycle requests are answered during
  inference. (rclpy's MultiThreadedExecutor was measured here to cost the inference thread most
  of its CPU and GIL under a fast camera; one thread with tiny callbacks needs no more.)
- one worker thread (configure -> cleanup): takes the newest frame, deserializes and converts it,
  runs `agent.act`, publishes. Instruction and limit changes are applied here too, between frames.

Lifecycle: configure loads the engine (Agent) and creates publishers and subscriptions; activate
starts processing; deactivate stops, publishing a zero Twist; cleanup frees the agent; shutdown
from active publishes a zero Twist first. `/diagnostics` is published in every state.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Twist
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import Node as LifecycleNode
from rclpy.lifecycle import State, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from gemma4_agent.agent import ActResult, Agent, AgentConfig
from gemma4_agent.engine.kv_cache import CacheFull
from gemma4_agent.errors import one_line
from gemma4_agent.ros.frame_slot import LatestSlot
from gemma4_agent.ros.image_convert import BadImage, to_rgb
from gemma4_agent.ros.params import BY_NAME, PARAMETERS, SAFETY_PARAMETERS, ParamSpec
from gemma4_agent.ros.stats import NodeStats

NODE_NAME = "gemma4_agent"
WATCHDOG_PERIOD_S = 0.1
DIAGNOSTICS_PERIOD_S = 1.0
SENSOR_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                        reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
COMMAND_QOS = 10  # reliable, volatile, keep last 10: what `ros2 topic echo` and base controllers expect
_PARAM_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    d = ParameterDescriptor(name=spec.name, type=_PARAM_TYPES[type(spec.default)], description=spec.description,
                            read_only=spec.when == "startup")
    notes = [f"applied on {spec.when}"]
    if spec.choices is not None:
        notes.append("one of " + ", ".join(map(str, spec.choices)))
    d.additional_constraints = "; ".join(notes)
    if spec.range is not None and isinstance(spec.default, float):
        d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]), to_value=float(spec.range[1]))]
    elif spec.range is not None and isinstance(spec.default, int):
        d.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    return d


def twist_msg(twist: Optional[Dict[str, float]] = None) -> Twist:
    """geometry_msgs/Twist from the agent's {"linear_x", "angular_z"} (None: zero)."""
    msg = Twist()
    if twist:
        msg.linear.x = float(twist["linear_x"])
        msg.angular.z = float(twist["angular_z"])
    return msg


def _stamp_s(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class AgentNode(LifecycleNode):
    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.stats = NodeStats()
        self._slot = LatestSlot()
        self._state_lock = threading.Lock()                # guards _active and every cmd_vel publish
        self._active = False
        self._lifecycle_label = "unconfigured"
        self._agent = None
        self._agent_config = None
        self._configure_error: Optional[str] = None
        self._bad_params: Dict[str, str] = {}  # name -> why its value at start-up was refused
        self._worker: Optional[threading.Thread] = None
        self._worker_stop = threading.Event()
        self._pending: Dict[str, Any] = {}   # agent updates the worker applies between frames
        self._pending_lock = threading.Lock()
        self._last_valid_command = time.monotonic()
        self._stopped_by_watchdog = True
        self._reported_counts = self.stats.snapshot()[0]
        self._pub_cmd = self._pub_action = None
        self._subs: List[Any] = []
        self._image_type: Any = Image

        self.add_on_set_parameters_callback(self._on_set_parameters)
        for spec in PARAMETERS:
            why = self._refused_override(spec)
            # a refused value is set aside (the default declared), not raised out of the constructor
            self.declare_parameter(spec.name, spec.default, descriptor(spec), ignore_override=why is not None)
            if why is not None and spec.when != "startup":  # after declaring: that sets the default, which
                self._bad_params[spec.name] = why          # _on_set_parameters takes as a fix
        self._answer_invalid_transitions()
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", COMMAND_QOS)
        self.create_timer(WATCHDOG_PERIOD_S, self._on_watchdog)
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._on_diagnostics)

    def _answer_invalid_transitions(self) -> None:
        """rclpy raises out of the change_state service on a transition invalid in the current state
        (e.g. activate while unconfigured): no reply, and the exception ends the executor's spin.
        Answer success=False instead, as rclcpp does."""
        service = getattr(self, "_service_change_state", None)
        if service is None:
            return
        handle = service.callback

        def change_state(request: Any, response: Any) -> Any:
            try:
                return handle(request, response)
            except Exception as err:
                self.get_logger().warning(f"transition {request.transition.id} {request.transition.label!r} "
                                          f"refused: {err}")
                response.success = False
                return response
        service.callback = change_state

    # ---- parameters --------------------------------------------------------------------------

    def _refused_override(self, spec: ParamSpec) -> Optional[str]:
        """Why the value the params file or `-p` gives this parameter is refused, or None. rclpy would raise
        on a wrong type or range out of the constructor (a traceback, the node gone): instead the default is
        declared, the reason said once, and configure refused until a valid value is set (`ros2 param set`)."""
        given = getattr(self, "_parameter_overrides", {}).get(spec.name)  # rclpy's, read before declaring
        why = spec.check(given.value) if given is not None else None
        if why is None:
            return None
        if spec.when == "startup":  # read-only: cannot be fixed at runtime, so the default stands
            self.get_logger().error(f"parameter {why}: using the default {spec.default!r}")
        else:
            self.get_logger().error(f"parameter {why}: the node stays unconfigured until {spec.name} is set "
                                    f"to a valid value (fix the params file or -p, or `ros2 param set`)")
        return why

    def param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, params: List[Parameter]) -> SetParametersResult:
        for p in params:
            spec = BY_NAME.get(p.name)
            if spec is None:
                continue
            problem = spec.check(p.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            agent = self._agent
            if p.name == "instruction" and agent is not None:
                try:  # empty, or too long for the engine's prompt cache: refused here, the task before stays
                    agent.check_instruction(p.value)
                except (ValueError, CacheFull) as err:
                    return SetParametersResult(successful=False, reason=str(err))
        for p in params:
            self._bad_params.pop(p.name, None)  # a valid value replaces one refused at start-up
            spec = BY_NAME.get(p.name)
            if spec is None or self._agent is None:
                continue
            if p.name in ("instruction", "command_timeout_s"):
                self._request(p.name, p.value)
            elif spec.when == "configure":
                self.get_logger().info(f"{p.name} changed: applied on the next configure")
        return SetParametersResult(successful=True)

    def _request(self, key: str, value: Any = True) -> None:
        """Ask the worker to apply an agent update before its next frame (act is never concurrent)."""
        with self._pending_lock:
            self._pending[key] = value

    def _agent_config_kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {name: self.param(name) for name in ("backend", "device", "compile", "budget_ms")}
        # empty / 0: the AgentConfig default (bundled demo engine, package actions.yaml, engine's defaults)
        for name in ("engine", "actions", "instruction", "image_tokens"):
            if self.param(name):
                kwargs[name] = self.param(name)
        kwargs["safety"] = {name: self.param(name) for name in SAFETY_PARAMETERS}  # the node's limits win
        return kwargs

    # ---- lifecycle ---------------------------------------------------------------------------

    def on_configure(self, state: State) -> TransitionCallbackReturn:
        try:
            if self._bad_params:
                raise ValueError("invalid parameter(s): " + "; ".join(self._bad_params.values()))
            self._agent_config = AgentConfig(**self._agent_config_kwargs())
            started = time.monotonic()
            self._agent = Agent(self._agent_config)
        except Exception as err:  # a bad engine or config leaves the node unconfigured, not dead
            self._configure_error = f"{type(err).__name__}: {one_line(err)}"
            self.get_logger().error(f"configure failed: {self._configure_error}")
            self._agent = self._agent_config = None
            return TransitionCallbackReturn.FAILURE
        self._configure_error = None
        self.get_logger().info(
            f"agent ready in {time.monotonic() - started:.1f} s: engine {self._agent_config.engine}, "
            f"{self._agent_config.backend}/{self._agent_config.device}, {self._agent.image_tokens} image tokens, "
            f"budget {self._agent_config.budget_ms:.0f} ms, instruction {self._agent.instruction!r}")
        with self._pending_lock:
            self._pending.clear()
        self._pub_cmd = self.create_lifecycle_publisher(Twist, "cmd_vel", COMMAND_QOS)
        self._pub_action = self.create_lifecycle_publisher(String, "~/action", COMMAND_QOS)
        # raw=True: the callback gets the CDR bytes; only the frame the worker takes is deserialized,
        # so a fast camera costs the executor (and the GIL the inference needs) next to nothing.
        self._image_type, topic = ((CompressedImage, "image/compressed")
                                   if self.param("image_transport") == "compressed" else (Image, "image"))
        image_sub = self.create_subscription(self._image_type, topic, self._on_image, SENSOR_QOS, raw=True)
        instruction_sub = self.create_subscription(String, "instruction", self._on_instruction, 10)
        self._subs = [image_sub, instruction_sub]
        self._slot.reopen()
        self._worker_stop.clear()
        self._worker = threading.Thread(target=self._work, name="gemma4_agent_worker", daemon=True)
        self._worker.start()
        self._lifecycle_label = "inactive"
        return super().on_configure(state)

    def on_activate(self, state: State) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enable the lifecycle publishers first
        with self._state_lock:
            self._slot.clear()
            self._last_valid_command = time.monotonic()  # the watchdog counts from activation
            self._stopped_by_watchdog = False
            self._request("reset_motion")                # the robot stands: ramp up from rest
            self._active = True
        self._lifecycle_label = "active"
        self.get_logger().info("active: processing frames")
        return result

    def on_deactivate(self, state: State) -> TransitionCallbackReturn:
        self._stop_commands()
        self._lifecycle_label = "inactive"
        self.get_logger().info("inactive: published a zero Twist")
        return super().on_deactivate(state)

    def on_cleanup(self, state: State) -> TransitionCallbackReturn:
        self._release()
        self._lifecycle_label = "unconfigured"
        self.get_logger().info("unconfigured: agent freed")
        return super().on_cleanup(state)

    def on_shutdown(self, state: State) -> TransitionCallbackReturn:
        if self._active:
            self._stop_commands(wait_acked_s=0.5)
        self._release()
        self._lifecycle_label = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: State) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while in {state.label}: stopping and freeing the agent")
        if self._active:
            self._stop_commands()
        self._release()
        self._lifecycle_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def _stop_commands(self, wait_acked_s: float = 0.0) -> None:
        """Stop processing; publish one zero Twist, after which no command of an in-flight frame goes out."""
        with self._state_lock:
            self._active = False
            if self._pub_cmd is not None:
                self._pub_cmd.publish(twist_msg())
        if self._slot.clear():
            self.stats.count("dropped_inactive")
        if wait_acked_s > 0 and self._pub_cmd is not None:  # at exit: let the stop reach the base
            self._pub_cmd.wait_for_all_acked(Duration(seconds=wait_acked_s))

    def _release(self) -> None:
        """Stop the worker (waiting for an in-flight frame), drop subscriptions, publishers and the agent."""
        self._active = False
        self._worker_stop.set()
        self._slot.close()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        for pub in (self._pub_cmd, self._pub_action):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._pub_cmd = self._pub_action = None
        self._agent = None

    # ---- callbacks (executor thread: keep them tiny) -------------------------------------------

    def _on_image(self, data: bytes) -> None:
        if not self._active:
            return
        self.stats.count("frames_received")
        if self._slot.put((data, self.get_clock().now().nanoseconds * 1e-9)):
            self.stats.count("dropped_replaced")

    def _on_instruction(self, msg: String) -> None:
        result = self.set_parameters([Parameter("instruction", Parameter.Type.STRING, msg.data)])[0]
        if not result.successful:
            self.get_logger().warning(f"instruction rejected: {result.reason}")

    def _on_watchdog(self) -> None:
        with self._state_lock:
            if not self._active or self._stopped_by_watchdog:
                return
            if time.monotonic() - self._last_valid_command < self.param("command_timeout_s"):
                return
            self._pub_cmd.publish(twist_msg())
            self._stopped_by_watchdog = True
            self._request("reset_motion")  # the next command ramps up from rest
        self.stats.count("watchdog_stops")
        self.get_logger().warning(
            f"no valid command for {self.param('command_timeout_s'):.2f} s: published a zero Twist")

    def _on_diagnostics(self) -> None:
        counts, _, _ = self.stats.snapshot()
        previous, self._reported_counts = self._reported_counts, counts
        worse = [name for name in ("deadline_misses", "fallbacks", "bad_images", "dropped_stale", "watchdog_stops")
                 if counts[name] > previous[name]]
        status = DiagnosticStatus(name=f"{self.get_name()}: inference", hardware_id=self._hardware_id())
        if self._configure_error and self._agent is None:
            status.level, status.message = DiagnosticStatus.ERROR, f"configure failed: {self._configure_error}"
        elif worse:
            status.level, status.message = DiagnosticStatus.WARN, f"{self._lifecycle_label}; new: {', '.join(worse)}"
        else:
            status.level, status.message = DiagnosticStatus.OK, self._lifecycle_label
        instruction = self._agent.instruction if self._agent is not None else self.param("instruction")
        values = [("lifecycle_state", self._lifecycle_label), ("instruction", instruction),
                  ("budget_ms", f"{self.param('budget_ms'):g}")]
        status.values = [KeyValue(key=k, value=v) for k, v in values + self.stats.key_values()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self._pub_diag.publish(array)

    def _hardware_id(self) -> str:
        cfg = self._agent_config
        return f"{cfg.engine} ({cfg.backend}/{cfg.device})" if cfg is not None else "none"

    # ---- worker thread --------------------------------------------------------------------------

    def _work(self) -> None:
        agent = self._agent
        while not self._worker_stop.is_set():
            try:
                item = self._slot.take(timeout=0.1)
                self._apply_pending(agent)  # after take: a frame never precedes an update requested before it
                if item is None:
                    continue
                if not self._active:
                    self.stats.count("dropped_inactive")
                    continue
                self._process(agent, *item)
            except Exception as err:  # never let one frame kill the worker
                self.get_logger().error(f"worker: {type(err).__name__}: {err}")

    def _apply_pending(self, agent: Any) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if "reset_motion" in pending:
            agent.reset_motion()
        if "command_timeout_s" in pending:
            agent.set_safety(command_timeout_s=pending["command_timeout_s"])
        if "instruction" in pending:
            started = time.monotonic()
            try:
                agent.set_instruction(pending["instruction"])
            except (ValueError, CacheFull) as err:  # refused: the task before stays (see check_instruction)
                self.get_logger().error(f"instruction rejected by the agent: {err}")
                return
            self.get_logger().info(f"instruction set in {(time.monotonic() - started) * 1e3:.0f} ms: "
                                   f"{agent.instruction!r}")

    def _process(self, agent: Any, data: bytes, received_s: float) -> None:
        picked_up_s = self.get_clock().now().nanoseconds * 1e-9
        started = time.perf_counter()
        try:
            msg = deserialize_message(data, self._image_type)
        except Exception as err:  # DDS delivered bytes that are not this message type
            self._bad_image(BadImage("decode_failed", f"CDR: {type(err).__name__}: {err}"))
            return
        stamp_s = _stamp_s(msg.header.stamp) or received_s  # an unstamped frame counts from its arrival
        try:
            rgb = to_rgb(msg)
        except BadImage as bad:
            self._bad_image(bad)
            return
        convert_ms = (time.perf_counter() - started) * 1e3
        try:
            result = agent.act(rgb, stamp_s=stamp_s, now_s=picked_up_s)
        except Exception as err:  # a bug, not a bad frame: stop the robot, keep serving
            self.get_logger().error(f"agent.act failed: {type(err).__name__}: {err}; publishing a stop")
            result = ActResult("fallback", twist={"linear_x": 0.0, "angular_z": 0.0},
                               error=f"{type(err).__name__}: {err}")
        result.timings_ms["convert"] = convert_ms
        self._publish_result(result, msg, stamp_s)

    def _bad_image(self, bad: BadImage) -> None:
        if self.stats.bad_image(bad.kind) == 1:
            self.get_logger().warning(f"bad image ({bad.kind}), dropped: {bad.detail} "
                                      "[logged once per kind; counts on /diagnostics]")

    def _publish_result(self, result: ActResult, msg: Any, stamp_s: float) -> None:
        is_command = result.status in ("ok", "fallback") and result.twist is not None
        with self._state_lock:
            if not self._active:  # deactivated during inference: its zero Twist was the last word
                self.stats.count("dropped_inactive")
                return
            if is_command:
                self._pub_cmd.publish(twist_msg(result.twist))
                if result.status == "ok":
                    self._last_valid_command = time.monotonic()
                    self._stopped_by_watchdog = False
        latency_ms = (self.get_clock().now().nanoseconds * 1e-9 - stamp_s) * 1e3
        self._count(result, latency_ms, is_command)
        stamp = msg.header.stamp
        self._pub_action.publish(String(data=result.to_json(
            stamp={"sec": stamp.sec, "nanosec": stamp.nanosec}, frame_id=msg.header.frame_id,
            latency_ms=round(latency_ms, 3), free_tokens=result.free_tokens, deadline_hit=result.deadline_hit)))

    def _count(self, result: ActResult, latency_ms: float, is_command: bool) -> None:
        status = result.status
        if status == "dropped_stale":
            self.stats.count("dropped_stale")
            return
        if status == "bad_frame":
            if self.stats.bad_image("rejected_by_agent") == 1:
                self.get_logger().warning("the agent rejected a frame (bad_frame) [logged once]")
            return
        if not is_command:
            return
        self.stats.count("frames_processed")
        self.stats.count("commands_ok" if status == "ok" else "fallbacks")
        if latency_ms > self.param("budget_ms"):
            self.stats.count("deadline_misses")
        self.stats.latency("end_to_end", latency_ms)
        for stage, ms in result.timings_ms.items():
            self.stats.latency(stage, float(ms))

    # ---- start-up -----------------------------------------------------------------------------

    def autostart(self) -> bool:
        """Configure and activate, as a lifecycle manager would. False if configure failed."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def finish(self) -> None:
        """Shutdown transition from whatever state the node is in (zero Twist if it was active)."""
        if self._lifecycle_label == "finalized":
            return
        try:
            self.trigger_shutdown()
        except Exception as err:  # e.g. mid-transition: free what we hold anyway
            self.get_logger().warning(f"shutdown transition: {err}")
            if self._active:
                self._stop_commands(wait_acked_s=0.5)
            self._release()


def _init_ros(args: List[str]) -> None:
    """rclpy.init without rclpy's own signal handlers: ours stop the robot before the context goes."""
    try:
        from rclpy.signals import SignalHandlerOptions
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    except (ImportError, TypeError):
        rclpy.init(args=args)


def _spin(executor: SingleThreadedExecutor, stop: threading.Event, logger: Any) -> None:
    """executor.spin, kept alive: rclpy lets a callback's exception (e.g. an invalid lifecycle
    transition requested over the service) end spin; a robot node must keep serving."""
    while not stop.is_set() and rclpy.ok():
        try:
            executor.spin()
            return  # executor shut down
        except Exception as err:
            logger.error(f"callback raised {type(err).__name__}: {err}; still serving")


def main(args: Optional[List[str]] = None) -> int:
    args = sys.argv if args is None else args
    # The core logs through Python logging (e.g. an invalid model output -> fallback): show it.
    logging.basicConfig(level=logging.WARNING, format="[%(levelname)s] [%(name)s]: %(message)s")
    _init_ros(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = AgentNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=_spin, args=(executor, stop, node.get_logger()),
                               name="gemma4_agent_executor", daemon=True)
    spinner.start()
    try:
        if node.param("autostart") and not stop.is_set() and not node.autostart():
            node.get_logger().error("autostart failed: the node stays unconfigured (see the error above)")
        while not stop.wait(0.2) and rclpy.ok():
            pass
    finally:
        # Teardown that never aborts at exit: stop the executor, join it, then free the node.
        executor.shutdown()
        spinner.join()
        node.finish()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
