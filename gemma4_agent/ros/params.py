"""The node's parameters as data: one table that the node declares from and the docs and tests read.

No ROS import here, so the launch-file check and the docs can use it without rclpy.
`when` says when a change takes effect: "configure" (read by the configure transition: change it,
then cleanup + configure), "runtime" (applied at once while the node runs) or "startup" (read once
when the process starts; read-only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

Value = Union[bool, int, float, str]

IMAGE_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
BACKENDS = ("torch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
IMAGE_TRANSPORTS = ("raw", "compressed")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Value
    description: str
    when: str = "configure"                          # "configure" | "runtime"
    range: Optional[Tuple[float, float]] = None      # inclusive, for int and float parameters
    choices: Optional[Tuple[Value, ...]] = None      # allowed values, checked on every set

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "int", float: "double", str: "string"}[type(self.default)]

    def check(self, value: Value) -> Optional[str]:
        """Why `value` is not acceptable for this parameter, or None if it is."""
        if type(value) is not type(self.default):
            hint = f" (write {float(value)!r})" if isinstance(self.default, float) and type(value) is int else ""
            return f"{self.name} must be a {self.type_name}, got {type(value).__name__} {value!r}{hint}"
        if self.range is not None and not (self.range[0] <= value <= self.range[1]):
            return f"{self.name}={value!r} is outside [{self.range[0]}, {self.range[1]}]"
        if self.choices is not None and value not in self.choices:
            return f"{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}"
        return None


PARAMETERS: Tuple[ParamSpec, ...] = (
    # Agent core (AgentConfig fields), read on configure.
    ParamSpec("engine", "", "Engine folder (manifest.json + weights). Empty: the bundled demo engine (engines/demo)."),
    ParamSpec("actions", "", "Action vocabulary file (actions.yaml). Empty: the package's config/actions.yaml."),
    ParamSpec("backend", "torch", "Inference backend.", choices=BACKENDS),
    ParamSpec("device", "cpu", "Device the engine runs on.", choices=DEVICES),
    ParamSpec("compile", False, "torch backend: torch.compile the decoder at configure, with one throw-away "
              "frame (30 s for the demo engine on CPU, minutes at the 12B shape); frames ~2x faster (BENCHMARKS.md)."),
    ParamSpec("image_tokens", 0, "Image token budget per frame (48x48-pixel patches). 0: the engine's default.",
              range=(0, 1120), choices=(0, *IMAGE_TOKEN_BUDGETS)),
    ParamSpec("budget_ms", 500.0, "Latency budget per frame, from capture stamp to command. A frame older "
              "than this when picked up is dropped; a decode that would pass it publishes the fallback.",
              range=(1.0, 60000.0)),
    ParamSpec("instruction", "go to the red ball", "Task instruction (the cached prompt prefix); also set by "
              "the `instruction` topic. Empty at configure: the engine's default instruction.", when="runtime"),
    # Safety limits: they replace the action file's `safety` values; every command passes them.
    ParamSpec("max_linear_x", 0.5, "Largest |linear.x| published (m/s).", range=(0.001, 10.0)),
    ParamSpec("max_angular_z", 1.0, "Largest |angular.z| published (rad/s).", range=(0.001, 10.0)),
    ParamSpec("max_linear_accel", 0.5, "Largest increase of |linear.x| per second (m/s^2).", range=(0.001, 100.0)),
    ParamSpec("max_angular_accel", 2.0, "Largest increase of |angular.z| per second (rad/s^2).", range=(0.001, 100.0)),
    ParamSpec("command_timeout_s", 1.0, "Watchdog: with no valid command for this long, publish a zero Twist.",
              when="runtime", range=(0.05, 60.0)),
    # Node behaviour.
    ParamSpec("image_transport", "raw", "raw: subscribe `image` (sensor_msgs/Image); "
              "compressed: subscribe `image/compressed` (sensor_msgs/CompressedImage).", choices=IMAGE_TRANSPORTS),
    ParamSpec("autostart", True, "Configure and activate at start-up (no lifecycle manager needed).",
              when="startup"),
)

BY_NAME = {spec.name: spec for spec in PARAMETERS}
# Parameters that replace the same-named fields of the action file's safety limits (SafetyLimits).
SAFETY_PARAMETERS = ("max_linear_x", "max_angular_z", "max_linear_accel", "max_angular_accel", "command_timeout_s")
