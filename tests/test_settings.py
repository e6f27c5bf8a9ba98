"""Settings: defaults, environment, TOML file, command-line order, clear errors, and
`sonocase serve` started as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Destination, SettingsError, load_settings
from tests.support.common import free_port
from tests.support.dicom_peers import NodeProcess


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SONOCASE_* from the calling shell, none left behind (load_settings(config=)
    exports SONOCASE_CONFIG); relative paths land in tmp_path."""
    monkeypatch.setenv("SONOCASE_CONFIG", "")  # remembered as unset: removed after the test
    for name in list(os.environ):
        if name.startswith("SONOCASE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sonocase.toml"
    path.write_text(text)
    return path


def test_defaults_run_one_machine_without_services() -> None:
    s = load_settings()
    assert (s.ae_title, s.port, s.data_dir, s.durability) == ("SONOCASE", 11112, Path("sonocase-data"), "fsync")
    assert s.allowed_callers == [] and s.embedded_broker and s.tls_cert is None
    assert s.ledger_path == Path("sonocase-data/ledger.sqlite3")


def test_command_line_wins_over_environment_over_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = toml(tmp_path, 'port = 3000\nae_title = "FROMTOML"\nquiet_period_s = 9.5\n')
    monkeypatch.setenv("SONOCASE_CONFIG", str(config))
    s = load_settings()
    assert (s.port, s.ae_title, s.quiet_period_s) == (3000, "FROMTOML", 9.5)
    monkeypatch.setenv("SONOCASE_PORT", "4000")
    s = load_settings()
    assert (s.port, s.ae_title) == (4000, "FROMTOML")
    s = load_settings(port=5000, ae_title=None)  # None: option not given on the command line
    assert (s.port, s.ae_title) == (5000, "FROMTOML")


def test_lists_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SONOCASE_ALLOWED_CALLERS", "PACS, MODALITY1")
    monkeypatch.setenv("SONOCASE_DESTINATIONS", "PACS@pacs.example:104, ARCHIVE@10.0.0.9:11112+tls")
    s = load_settings()
    assert s.allowed_callers == ["PACS", "MODALITY1"]
    assert s.destinations == [
        Destination(ae_title="PACS", host="pacs.example", port=104),
        Destination(ae_title="ARCHIVE", host="10.0.0.9", port=11112, tls=True),
    ]


@pytest.mark.parametrize(
    "env,value,named",
    [
        ("SONOCASE_PORT", "0", "SONOCASE_PORT"),
        ("SONOCASE_PORT", "eleven", "SONOCASE_PORT"),
        ("SONOCASE_AE_TITLE", "BACK\\SLASH", "SONOCASE_AE_TITLE"),
        ("SONOCASE_DURABILITY", "maybe", "SONOCASE_DURABILITY"),
        ("SONOCASE_NON_ULTRASOUND", "accept", "SONOCASE_NON_ULTRASOUND"),
        ("SONOCASE_ALLOWED_CALLERS", "OK,WAY_TOO_LONG_FOR_AN_AE_TITLE", "SONOCASE_ALLOWED_CALLERS"),
        ("SONOCASE_TLS_CERT", "/nonexistent/cert.pem", "SONOCASE_TLS_CERT"),
    ],
)
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_unknown_toml_key_and_missing_file_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config=toml(tmp_path, "prot = 104\n"))
    monkeypatch.setenv("SONOCASE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(SettingsError, match=r"SONOCASE_CONFIG.*missing.toml"):
        load_settings()


def test_tls_needs_certificate_and_key_together(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("not checked here")
    with pytest.raises(SettingsError, match="TLS_CERT and SONOCASE_TLS_KEY"):
        load_settings(tls_cert=cert)


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SONOCASE_HOST": "127.0.0.1",
        "SONOCASE_HTTP_PORT": "0",
        "SONOCASE_DATA_DIR": str(tmp_path / "data"),
        "SONOCASE_DURABILITY": "none",
        "SONOCASE_WORKERS": "0",
        **extra,
    }


@pytest.mark.integration
def test_serve_as_a_process_with_command_line_overrides(tmp_path: Path) -> None:
    config = toml(tmp_path, f"port = {free_port()}\n")
    port = free_port()
    node = NodeProcess(
        serve_env(tmp_path, SONOCASE_CONFIG=str(config), SONOCASE_PORT=str(free_port())),
        ("--port", str(port), "--ae-title", "NODE1"),
    )
    assert node.ready_line == f"listening as NODE1 on 127.0.0.1:{port}"
    echo = subprocess.run(
        ["/usr/bin/echoscu", "-aec", "NODE1", "127.0.0.1", str(port)],
        check=False,
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    code, err = node.stop()
    assert code == 0, err
    assert "allowed_callers is empty" in err and "SIGTERM received" in err
    assert (tmp_path / "data" / "ledger.sqlite3").is_file()


@pytest.mark.integration
def test_serve_uses_environment_port_and_allow_list(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(serve_env(tmp_path, SONOCASE_PORT=str(port), SONOCASE_ALLOWED_CALLERS="PACS"))
    assert node.ready_line == f"listening as SONOCASE on 127.0.0.1:{port}"
    code, err = node.stop()
    assert code == 0 and "allowed_callers is empty" not in err


@pytest.mark.integration
def test_serve_refuses_invalid_settings_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        check=False,
        env={**os.environ, **serve_env(tmp_path, SONOCASE_MAX_ASSOCIATIONS="0")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "SONOCASE_MAX_ASSOCIATIONS" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_serve_help_explains_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--help"], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in ("--port", "--ae-title", "--data-dir"):
        assert option in result.stdout
