"""anywan-control options: flags > ANYWAN_* env > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from control import config as cfg
from control.cli import build_parser


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'api_listen = "10.0.0.1:1"\nid_suffix = "file.example"\n'
        '[control]\ndpd_interval = 7\nike_listen = ["203.0.113.1"]\nmax_account_labels = 3\n'
    )
    env = {"ANYWAN_API_LISTEN": "10.0.0.2:2", "ANYWAN_DPD_INTERVAL": "9.5",
           "ANYWAN_IKE_LISTEN": "203.0.113.5, 203.0.113.6"}  # fmt: skip
    args = build_parser().parse_args(["--config", str(f), "--api-listen", "10.0.0.3:3", "init"])
    conf = cfg.load(vars(args), env)
    assert conf.api_listen == "10.0.0.3:3"  # flag beats env and file
    assert conf.dpd_interval == 9.5  # env beats file
    assert conf.ike_listen == ("203.0.113.5", "203.0.113.6")
    assert conf.id_suffix == "file.example"  # file beats default
    assert conf.max_account_labels == 3
    assert conf.child_lifetime == 4 * 3600  # default
    assert conf.master_key_path == Path("/var/lib/anywan/master.key")
    env2 = {"ANYWAN_CONFIG": str(f), "ANYWAN_STATE_DIR": str(tmp_path)}
    conf = cfg.load({}, env2)
    assert conf.api_listen == "10.0.0.1:1" and conf.master_key_path == tmp_path / "master.key"


@pytest.mark.parametrize(
    ("env", "file", "message"),
    [
        ({"ANYWAN_DPD_INTERVAL": "soon"}, None, "ANYWAN_DPD_INTERVAL: dpd_interval"),
        ({"ANYWAN_API_LISTEN": "nohost"}, None, "api_listen"),
        ({"ANYWAN_LOG_LEVEL": "loud"}, None, "log_level"),
        ({"ANYWAN_IKE_PORTS": "500,x"}, None, "ike_ports"),
        ({}, "bogus = 1\n", "unknown option(s) bogus"),
        ({}, "api_listen = [\n", "not valid TOML"),
        ({}, "dpd_interval = -1\n", "dpd_interval: must be > 0"),
        ({}, "max_account_labels = true\n", "max_account_labels"),
        ({}, "control = 5\n", "control must be a table"),
        ({}, b"api_listen = '\xff'\n", "cannot read (UnicodeDecodeError)"),
    ],
)
def test_errors_name_the_source(
    tmp_path: Path, env: dict[str, str], file: str | bytes | None, message: str
) -> None:
    path = None
    if file is not None:
        path = tmp_path / "c.toml"
        path.write_bytes(file if isinstance(file, bytes) else file.encode())
    with pytest.raises(cfg.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cfg.load({}, env, path)


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="cannot read"):
        cfg.load({}, {}, tmp_path)


def test_every_option_has_flag_env_and_help() -> None:
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    for key, env, flag, help_text in cfg.describe():
        assert key in flags and env == "ANYWAN_" + key.upper() and flag.startswith("--")
        assert help_text


def test_flags_after_the_subcommand(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["--api-listen", "1.1.1.1:1", "serve", "--id-suffix", "x.example"])
    conf = cfg.load(vars(args), {})
    assert conf.api_listen == "1.1.1.1:1" and conf.id_suffix == "x.example"
    args = parser.parse_args(["token", "create", "--operator", "--state-dir", str(tmp_path)])
    assert cfg.load(vars(args), {}).state_dir == tmp_path


def test_cli_reports_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from control.cli import main

    assert main(["--dpd-interval", "x", "init"]) == 2
    assert "--dpd-interval: dpd_interval" in capsys.readouterr().err
