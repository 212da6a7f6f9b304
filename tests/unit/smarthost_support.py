"""Helpers shared by the smarthost plugin's unit tests: a config file from a TOML snippet."""

from __future__ import annotations

from pathlib import Path

import pytest

from submitd import Config, ConfigError
from submitd.config import load_config
from submitd_plugins import smarthost
from submitd_plugins._smarthost_config import SmarthostSettings, parse_settings

HEAD = 'hostname = "mx.example.org"\n[plugins]\nenable = ["smarthost"]\n'


def load(tmp_path: Path, text: str) -> Config:
    """``HEAD + text`` written to ``tmp_path/submitd.toml`` and loaded."""
    path = tmp_path / "submitd.toml"
    path.write_text(HEAD + text)
    return load_config(path)


def settings(tmp_path: Path, text: str) -> SmarthostSettings:
    """The parsed ``[plugins.smarthost]`` of ``HEAD + text``."""
    return parse_settings(load(tmp_path, text))


def error(tmp_path: Path, text: str) -> ConfigError:
    """The ConfigError ``HEAD + text`` raises; it must name the file."""
    with pytest.raises(ConfigError) as info:
        settings(tmp_path, text)
    assert str(tmp_path / "submitd.toml") in str(info.value)
    return info.value


def configured(tmp_path: Path, text: str) -> Config:
    """``HEAD + text`` loaded and passed through the plugin's ``submitd_configure``."""
    config = load(tmp_path, text)
    smarthost.submitd_configure(config)
    return config
