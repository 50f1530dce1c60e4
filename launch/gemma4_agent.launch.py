"""Launch the gemma4_agent node: camera frames in, safe cmd_vel out.

    ros2 launch gemma4_agent gemma4_agent.launch.py
    ros2 launch gemma4_agent gemma4_agent.launch.py engine:=/opt/engines/gemma4-12b-int4 \
        camera_topic:=/camera/color/image_raw instruction:="go to the red ball"

Parameters come from params_file (default: the package's config/agent.yaml); a non-empty engine or
instruction argument overrides the file's value. `image` is remapped to camera_topic and
`image/compressed` to camera_topic/compressed (the image_transport convention), so
image_transport: compressed in the params file needs no other change.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

OVERRIDABLE = ("engine", "instruction")  # launch arguments that, when not empty, override the params file


def node_with_overrides(context):
    camera_topic = LaunchConfiguration("camera_topic").perform(context)
    overrides = {}
    for name in OVERRIDABLE:
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    return [Node(
        package="gemma4_agent",
        executable="gemma4_agent_node",
        name="gemma4_agent",
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), overrides],
        remappings=[
            ("image", camera_topic),
            ("image/compressed", camera_topic.rstrip("/") + "/compressed"),
        ],
    )]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("gemma4_agent"), "config", "agent.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("engine", default_value="",
                              description="Engine folder; empty: the params file's (default: the bundled demo engine)"),
        DeclareLaunchArgument("instruction", default_value="",
                              description="Task instruction; empty: the params file's"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="Camera topic remapped to the node's `image` input"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="Parameters file (gemma4_agent: ros__parameters: ...)"),
        OpaqueFunction(function=node_with_overrides),
    ])
