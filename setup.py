"""Install galvatron; ``profiler/``, ``strategies/`` and ``launch/`` become ``galvatron.profiler``,
``galvatron.strategies`` and ``galvatron.launch``, and ``configs/`` ships as ``galvatron/configs``."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
TOP = {"galvatron.profiler": "profiler", "galvatron.strategies": "strategies", "galvatron.launch": "launch"}


def packages() -> tuple[list[str], dict[str, str]]:
    names = find_packages(include=["galvatron", "galvatron.*"])
    dirs = {"galvatron": "galvatron"}
    for package, folder in TOP.items():
        dirs[package] = folder
        names.append(package)
        names += [f"{package}.{sub}" for sub in find_packages(where=folder)]
    names.append("galvatron.configs")
    dirs["galvatron.configs"] = "configs"
    return names, dirs


names, dirs = packages()
setup(
    name="galvatron",
    version="0.1.0",
    description="Automatic hybrid parallelism for PyTorch training: profile, search, run.",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=names,
    package_dir=dirs,
    package_data={"galvatron.configs": ["*/*.yaml"]},
    install_requires=["torch>=2.11", "pyyaml>=6", "nvidia-ml-py>=12", "numpy>=1.24"],
    extras_require={
        "ray": ["ray[default]>=2.40"],
        "deepspeed": ["deepspeed>=0.19.8"],
        "megatron": ["megatron-core>=0.16.1,<0.17"],  # 0.17 needs Python >= 3.12
        "dev": ["pytest>=8", "hypothesis>=6.100", "ruff>=0.6", "transformers>=4.50", "ray[default]>=2.40",
                "matplotlib>=3.8", "deepspeed>=0.19.8"],
    },
    entry_points={"console_scripts": ["galvatron = galvatron.launch.cli:main"]},
)
