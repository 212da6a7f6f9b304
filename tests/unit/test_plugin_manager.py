"""Plugins load only from the allow-list, through entry points, using public names only."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

import submitd
from submitd.errors import ConfigError
from submitd.plugin_manager import available_plugins

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_MODULES = {"submitd", "submitd.client", "submitd.durable", "submitd.passwords"}


def test_every_builtin_plugin_is_an_entry_point() -> None:
    modules = {p.stem for p in (ROOT / "plugins" / "submitd_plugins").glob("*.py")
               if not p.name.startswith("_")}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "submitd"]
    assert set(declared) == modules
    installed = available_plugins()
    for name in modules:
        assert installed[name].value == f"submitd_plugins.{name}"
        importlib.import_module(f"submitd_plugins.{name}")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "plugins" / "submitd_plugins").glob("*.py")), ids=lambda p: p.name
)
def test_builtin_plugins_import_only_the_public_api(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("submitd"):
            assert node.level == 0
            assert node.module in PUBLIC_MODULES, f"{path.name} imports {node.module}"
            if node.module == "submitd":
                for alias in node.names:
                    assert alias.name in submitd.__all__, f"{path.name} imports {alias.name}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("submitd"):
                    assert alias.name in PUBLIC_MODULES, f"{path.name} imports {alias.name}"


def test_unknown_plugin_in_enable_names_the_key(tmp_path: Path) -> None:
    from dataclasses import replace

    from submitd.config import Config, Limits, PluginsConfig, QueueConfig
    from submitd.plugin_manager import create_plugin_manager

    config = Config(path=tmp_path / "submitd.toml", hostname="h", listeners=(), tls=None,
                    limits=Limits(), queue=QueueConfig(dir=tmp_path),
                    plugins=PluginsConfig(enable=("maildir", "nosuchplugin")))
    with pytest.raises(ConfigError) as info:
        create_plugin_manager(config)
    assert info.value.key == "plugins.enable[1]"
    assert "nosuchplugin" in str(info.value) and str(tmp_path) in str(info.value)
    ok = replace(config, plugins=PluginsConfig(enable=("maildir",)))
    pm = create_plugin_manager(ok)
    assert pm.has_plugin("maildir") and not pm.has_plugin("passwdfile")
