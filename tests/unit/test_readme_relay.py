"""The README's "Relay through your provider" examples pass ``submitd check-config`` as written.

Each ``toml`` block of that section is appended to a working configuration (a block without a
table header continues the one before it, as the README presents it), the files it names
(password files, client certificates) are created, and ``check-config`` must accept it: the
same validation the server runs at start-up, including the smarthost plugin's own.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import trustme

from submitd import cli
from submitd.testing import TestCA, write_config

ROOT = Path(__file__).resolve().parents[2]


def relay_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Relay through your provider", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, flags=re.DOTALL)
    examples: list[str] = []
    for block in blocks:
        if block.lstrip().startswith("[plugins.smarthost]"):
            examples.append(block)
        elif examples and not block.lstrip().startswith("["):
            examples[-1] += block  # "add these keys" to the example before
    return examples


def test_the_section_has_the_promised_examples() -> None:
    hosts = " ".join(relay_examples())
    for provider in ("smtp-relay.gmail.com", "amazonaws.com", "mailgun.org", "isp.example",
                     "mail.protection.outlook.com"):
        assert provider in hosts


@pytest.mark.parametrize("example", relay_examples(), ids=lambda e: e.split('"')[1])
def test_relay_example_passes_check_config(
    tmp_path: Path, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = TestCA(tmp_path / "tls")
    table = tomllib.loads(example)["plugins"]["smarthost"]
    for key in ("password_file",):
        if key in table:
            (tmp_path / table[key]).write_text("not-the-real-password\n")
    if "client_cert" in table:
        cert = trustme.CA().issue_cert("relay.example.org")
        (tmp_path / table["client_cert"]).parent.mkdir(parents=True, exist_ok=True)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / table["client_cert"]))
        cert.private_key_pem.write_to_path(str(tmp_path / table["client_key"]))
    path = write_config(tmp_path, ca=ca, enable=["smarthost"])
    path.write_text(path.read_text() + "\n" + example)
    assert cli.main(["check-config", "-c", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "[plugins.smarthost]" in out
    assert "not-the-real-password" not in out
