"""User-facing errors print as one line naming the file/key and the fix; --debug / VESPO_DEBUG=1 show the traceback."""

from __future__ import annotations

import pytest

from vespo_megatron import cli
from vespo_megatron.config.errors import ConfigError


def _bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("parallel:\n  tp: 2\n model:\n  x: [1, 2\n")
    return path


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from vespo_megatron.config import load_config

    with pytest.raises(ConfigError, match=r"bad.yaml:3:2: YAML syntax error") as err:
        load_config(_bad_yaml(tmp_path))
    assert "<unicode string>" not in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'model.x=\[1,': its value is not valid YAML"):
        load_config(None, ["model.x=[1,"])


def test_cli_prints_one_line_for_config_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["train", str(_bad_yaml(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "bad.yaml:3:2: YAML syntax error" in err and "--debug" in err
    assert cli.main(["train", str(_bad_yaml(tmp_path).parent / "missing.yaml")]) == 1
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(ConfigError):
        cli.main(["--debug", "train", str(_bad_yaml(tmp_path))])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        cli.main(["train", str(_bad_yaml(tmp_path))])


def test_internal_errors_are_not_hidden():
    assert cli.user_error_line(KeyError("x")) is None
    assert cli.user_error_line(ValueError("a.jsonl:3: bad\nsecond line")) == "ValueError: a.jsonl:3: bad second line"
