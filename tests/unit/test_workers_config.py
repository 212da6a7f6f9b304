"""``[server] workers``: numbers, ``"auto"``, bad values, and what check-config shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from submitd import cli
from submitd.config import MAX_WORKERS, Config, load_config, usable_cpus
from submitd.errors import ConfigError

ETC = Path(__file__).resolve().parents[2] / "etc"


def load(tmp_path: Path, server: str) -> Config:
    path = tmp_path / "submitd.toml"
    path.write_text(f'hostname = "mail.example.org"\n{server}')
    return load_config(path)


def workers(tmp_path: Path, server: str) -> int:
    return load(tmp_path, server).server.workers


def test_one_worker_by_default_and_in_the_sample(tmp_path: Path) -> None:
    assert workers(tmp_path, "") == 1
    assert workers(tmp_path, "[server]\n") == 1
    assert load_config(ETC / "submitd.toml").server.workers == 1


@pytest.mark.parametrize("value", [1, 2, 8, MAX_WORKERS])
def test_a_positive_integer_is_the_number_of_processes(tmp_path: Path, value: int) -> None:
    assert workers(tmp_path, f"[server]\nworkers = {value}\n") == value


def test_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    config = load(tmp_path, '[server]\nworkers = "auto"\n')
    assert config.server.auto
    assert config.server.workers == min(usable_cpus(), MAX_WORKERS)
    if hasattr(os, "sched_getaffinity"):
        assert usable_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("value", "says"), [
    ("0", "at least 1"),
    ("-2", "at least 1"),
    ("2.5", "must be an integer"),
    ("true", "must be an integer"),
    ('"two"', 'positive integer or "auto"'),
    ('"AUTO"', 'positive integer or "auto"'),
    ('"4"', 'positive integer or "auto"'),
    (str(MAX_WORKERS + 1), f"at most {MAX_WORKERS}"),
])
def test_a_bad_value_names_server_workers(tmp_path: Path, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[server]\nworkers = {value}\n")
    assert info.value.key == "server.workers"
    assert says in info.value.message


def test_an_unknown_server_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "[server]\nworker = 2\n")
    assert info.value.key == "server.worker"
    assert "did you mean 'workers'" in info.value.message


def test_check_config_shows_the_effective_number(tmp_path: Path) -> None:
    config = load(tmp_path, '[server]\nworkers = "auto"\n')
    text = cli.render_config(config)
    assert f"[server]\n# \"auto\": one worker per usable CPU\nworkers = {config.server.workers}\n" \
        in text
    # The rendering is itself a valid configuration with the same number.
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(text)
    assert load_config(rendered).server.workers == config.server.workers
    assert "workers = 3\n" in cli.render_config(
        load(tmp_path, "[server]\nworkers = 3\n")
    )
