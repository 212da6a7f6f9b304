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


# --- misspelled and unmarked hooks ------------------------------------------------------------


class Typo:
    """A plugin whose author misspelled submitd_data_filter."""

    @submitd.hookimpl
    def submitd_data_filer(self, message):  # never called if it were accepted
        return None


class Unmarked:
    """A plugin whose author forgot @submitd.hookimpl."""

    def submitd_mail_from(self, sender):
        return None


TYPO = Typo()
UNMARKED = Unmarked()


def _config(tmp_path: Path, *enable: str):
    from submitd.config import Config, Limits, PluginsConfig, QueueConfig

    return Config(path=tmp_path / "submitd.toml", hostname="h", listeners=(), tls=None,
                  limits=Limits(), queue=QueueConfig(dir=tmp_path),
                  plugins=PluginsConfig(enable=enable))


@pytest.fixture
def fake_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    import submitd.plugin_manager as manager

    real = manager.available_plugins()
    fakes = {name: importlib.metadata.EntryPoint(
        name=name, value=f"{__name__}:{name.upper()}", group="submitd")
        for name in ("typo", "unmarked")}
    monkeypatch.setattr(manager, "available_plugins", lambda: {**real, **fakes})


@pytest.mark.usefixtures("fake_installed")
def test_a_misspelled_hook_is_refused_naming_the_enable_entry_and_the_right_name(
    tmp_path: Path,
) -> None:
    from submitd.plugin_manager import create_plugin_manager

    with pytest.raises(ConfigError) as info:
        create_plugin_manager(_config(tmp_path, "maildir", "typo"))
    assert info.value.key == "plugins.enable[1]"
    assert "plugin 'typo' implements submitd_data_filer" in str(info.value)
    assert "did you mean submitd_data_filter?" in str(info.value)


@pytest.mark.usefixtures("fake_installed")
def test_a_hook_without_hookimpl_is_refused(tmp_path: Path) -> None:
    from submitd.plugin_manager import create_plugin_manager

    with pytest.raises(ConfigError) as info:
        create_plugin_manager(_config(tmp_path, "unmarked"))
    assert info.value.key == "plugins.enable[0]"
    assert "submitd_mail_from is not marked with @submitd.hookimpl" in str(info.value)


def test_an_in_process_plugin_with_a_misspelled_hook_is_refused_too(tmp_path: Path) -> None:
    from submitd.plugin_manager import create_plugin_manager

    with pytest.raises(ConfigError, match="did you mean submitd_data_filter"):
        create_plugin_manager(_config(tmp_path), extra=[("typo", Typo())])


@pytest.mark.usefixtures("fake_installed")
def test_check_config_refuses_a_misspelled_hook(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from submitd.cli import main
    from submitd.testing import TestCA, write_config

    path = write_config(tmp_path, ca=TestCA(tmp_path / "tls"), enable=["typo"])
    assert main(["check-config", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "plugins.enable[0]" in err and "did you mean submitd_data_filter?" in err


def test_start_up_logs_the_loaded_plugins_with_versions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from submitd.plugin_manager import create_plugin_manager

    class Extra:
        __version__ = "1.2"

    with caplog.at_level(logging.INFO, logger="submitd.plugins"):
        create_plugin_manager(_config(tmp_path, "maildir", "headers"), extra=[("extra", Extra())])
    (line,) = [r.getMessage() for r in caplog.records if "plugins_loaded" in r.getMessage()]
    version = submitd.__version__
    assert line == (f"event=plugins_loaded names=maildir:{version},headers:{version},extra:1.2"
                    " count=3")
