"""Where the bundled YAML (``configs/``) lives, and lookup of presets by name."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from galvatron.errors import ConfigError


@lru_cache(maxsize=1)
def config_root() -> Path:
    """The ``configs/`` folder: installed as package data ``galvatron/configs``, or the source tree's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "models").is_dir():
            return candidate
    raise ConfigError(f"galvatron's configs/ folder is missing (looked beside {here})")


def presets(kind: str) -> list[str]:
    """Names of the presets of one kind (``models``, ``clusters``, ``hardware``, ``plans``)."""
    return sorted(p.stem for p in (config_root() / kind).glob("*.yaml"))


def find_config(kind: str, name_or_path: str) -> Path:
    """A YAML file given as a path, or as a preset name of ``kind``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
        return path
    preset = config_root() / kind / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown {kind[:-1]} preset {name_or_path!r}; known: {', '.join(presets(kind))}")
    return preset
