from glob import glob

from setuptools import find_namespace_packages, setup

PACKAGE = "cvseg_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    # the layers' subpackages plus cvseg_ros.checkpoints, a data-only package with the shipped weights
    packages=find_namespace_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={f"{PACKAGE}.checkpoints": ["*.safetensors", "*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "setuptools",
        "numpy",
        "numba",
        "av>=14",
        "opencv-python-headless<5",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "rosbags>=0.11",
        "torchfile",
    ],
    extras_require={"test": ["pytest", "hypothesis", "pytest-timeout"]},
    zip_safe=True,
    maintainer="cvseg_ros developers",
    maintainer_email="cvseg@example.com",
    description="Semantic segmentation of H.264 camera streams in the compressed domain (ROS 2 node)",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "cvseg = cvseg_ros.tools.cli:main",
            "cvseg_node = cvseg_ros.ros.node:main",
        ],
    },
)
