"""The launch file, checked without ROS 2 launch (not on PyPI): parsed with `ast`, then run against
stand-ins for launch/launch_ros that record what it builds."""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from gemma4_agent.ros.params import BY_NAME, PARAMETERS

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "gemma4_agent.launch.py"
PARAMS_FILE = REPO / "config" / "agent.yaml"
NODE_PY = REPO / "gemma4_agent" / "ros" / "node.py"


def calls(tree: ast.AST, name: str):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def literal_kwargs(call: ast.Call) -> dict:
    out = {}
    for kw in call.keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            out[kw.arg] = kw.value
    return out


def console_scripts() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    for call in calls(tree, "setup"):
        entry_points = literal_kwargs(call)["entry_points"]
        return dict(line.replace(" ", "").split("=", 1) for line in entry_points["console_scripts"])
    raise AssertionError("no setup() call in setup.py")


def node_parameters_file() -> dict:
    doc = yaml.safe_load(PARAMS_FILE.read_text())
    assert list(doc) == ["gemma4_agent"] and list(doc["gemma4_agent"]) == ["ros__parameters"], doc
    return doc["gemma4_agent"]["ros__parameters"]


def test_launch_file_parses_and_names_the_installed_executable():
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    nodes = calls(tree, "Node")
    assert len(nodes) == 1
    kwargs = literal_kwargs(nodes[0])
    assert kwargs["package"] == "gemma4_agent" and kwargs["name"] == "gemma4_agent"
    scripts = console_scripts()
    assert kwargs["executable"] in scripts
    module, function = scripts[kwargs["executable"]].split(":")
    assert module == "gemma4_agent.ros.node"
    node_tree = ast.parse(NODE_PY.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == function for n in node_tree.body)
    declared = {ast.literal_eval(c.args[0]) if c.args else literal_kwargs(c)["name"]
                for c in calls(tree, "DeclareLaunchArgument")}
    assert {"engine", "instruction", "camera_topic", "params_file"} <= declared


def test_package_installs_launch_and_config_and_declares_dependencies():
    setup = (REPO / "setup.py").read_text()
    for folder in ("launch", "config", "engines"):
        assert f'tree("{folder}")' in setup
    assert (REPO / "resource" / "gemma4_agent").exists()
    package = ET.parse(REPO / "package.xml").getroot()
    depends = {e.text for e in package.iter("exec_depend")}
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "diagnostic_msgs", "lifecycle_msgs",
            "launch", "launch_ros"} <= depends
    assert package.find("export/build_type").text == "ament_python"


def test_params_file_keys_are_declared_parameters_with_valid_defaults():
    params = node_parameters_file()
    assert set(params) <= set(BY_NAME), set(params) - set(BY_NAME)
    assert set(params) == set(BY_NAME), f"not in the params file: {set(BY_NAME) - set(params)}"
    for name, value in params.items():
        spec = BY_NAME[name]
        assert spec.check(value) is None, spec.check(value)  # also the type: 500 is not a double
        assert value == spec.default, f"{name}: params file {value!r} != declared default {spec.default!r}"


def test_node_declares_every_parameter_from_the_table():
    """node.py declares exactly the table: a loop over PARAMETERS and no other declare_parameter."""
    tree = ast.parse(NODE_PY.read_text())
    declares = calls(tree, "declare_parameter") + calls(tree, "declare_parameters")
    assert len(declares) == 1, "parameters must be declared from gemma4_agent.ros.params.PARAMETERS only"
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and getattr(n.iter, "id", None) == "PARAMETERS"]
    assert any(declares[0] in ast.walk(loop) for loop in loops)
    for spec in PARAMETERS:
        assert spec.description and spec.when in ("configure", "runtime", "startup")
        if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            assert spec.range is not None, f"{spec.name} needs a range"


class _Recorder:
    """Stand-in for a launch class: keeps its arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def _stub_launch_modules(monkeypatch, share: Path) -> None:
    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return context[self.name]

    modules = {
        "launch": {"LaunchDescription": _Recorder},
        "launch.actions": {"DeclareLaunchArgument": _Recorder, "OpaqueFunction": _Recorder},
        "launch.substitutions": {"LaunchConfiguration": LaunchConfiguration},
        "launch_ros": {},
        "launch_ros.actions": {"Node": _Recorder},
        "ament_index_python": {},
        "ament_index_python.packages": {"get_package_share_directory": lambda package: str(share / package)},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def _run_launch(monkeypatch, tmp_path, **arguments):
    _stub_launch_modules(monkeypatch, tmp_path)
    spec = importlib.util.spec_from_file_location("gemma4_agent_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    context = {**declared, **arguments}
    opaque = [e for e in entities if "function" in e.kwargs]
    [node] = opaque[0].kwargs["function"](context)
    return declared, node.kwargs


def test_launch_builds_the_node_with_params_file_overrides_and_remaps(monkeypatch, tmp_path):
    declared, node = _run_launch(monkeypatch, tmp_path)
    assert declared["params_file"] == str(tmp_path / "gemma4_agent" / "config" / "agent.yaml")
    assert node["executable"] == "gemma4_agent_node" and node["name"] == "gemma4_agent"
    params_file, overrides = node["parameters"]
    assert params_file.name == "params_file" and overrides == {}  # empty arguments keep the file's values
    assert dict(node["remappings"]) == {"image": "/camera/image_raw", "image/compressed": "/camera/image_raw/compressed"}

    _, node = _run_launch(monkeypatch, tmp_path, engine="/opt/engines/x", instruction="go to the door",
                          camera_topic="/front/image_raw/")
    assert node["parameters"][1] == {"engine": "/opt/engines/x", "instruction": "go to the door"}
    assert dict(node["remappings"]) == {"image": "/front/image_raw/", "image/compressed": "/front/image_raw/compressed"}
    assert set(node["parameters"][1]) <= set(BY_NAME)


def test_docs_list_every_parameter_with_its_type():
    readme = (REPO / "README.md").read_text()
    readme = readme[readme.index("<!-- ros-interface:start -->"):readme.index("<!-- ros-interface:end -->")]
    ros_md = (REPO / "docs" / "ROS.md").read_text()
    for spec in PARAMETERS:
        row = f"| `{spec.name}` | {spec.type_name} |"
        assert row in readme, f"README ROS section lacks {row}"
        assert row in ros_md, f"docs/ROS.md lacks {row}"
