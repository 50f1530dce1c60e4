"""ament_python package: installs under colcon on a robot and with pip in a venv."""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "gemma4_agent"


def tree(folder):
    """data_files entries that install `folder` recursively under share/<package>/."""
    entries = {}
    for path in glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            entries.setdefault(os.path.join("share", PACKAGE, os.path.dirname(path)), []).append(path)
    return sorted(entries.items())


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    python_requires=">=3.10",
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE]),
        ("share/" + PACKAGE, ["package.xml"]),
        *tree("launch"),
        *tree("config"),
        *tree("engines"),
        *tree("data"),
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="gemma4_agent maintainers",
    description="Gemma 4 Unified VLM in the robot control loop",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "gemma4_agent_node = gemma4_agent.ros.node:main",
            "gemma4-agent = gemma4_agent.cli:main",
        ],
    },
)
