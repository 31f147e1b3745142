"""The edge configuration layer: option > TANDEM_* environment > TOML file > enrollment >
default, with one-line errors naming where a bad value came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.edge import load_config, parse_mode
from tandem.edge._config import parse_shapes
from tandem.protocol.errors import InvalidArgument, NotFound


def test_precedence_option_env_file_enrollment_default(tmp_path):
    f = tmp_path / "edge.toml"
    f.write_text('[edge]\napi_port = 9001\ndeadline_ms = 40\nbundle = "b"\nmode = "local"\n')
    env = {"TANDEM_API_PORT": "9002", "TANDEM_HYSTERESIS": "0.25"}
    cfg = load_config({"api_port": 9003, "device_id": "cam-1"}, env=env, config_file=f,
                      enrollment={"device_id": "enrolled", "profile": "jetson-orin-nano-8gb",
                                  "mode": "cloud"})
    assert cfg.api_port == 9003  # option
    assert cfg.hysteresis == 0.25  # environment
    assert cfg.deadline_ms == 40.0 and cfg.mode == "local"  # file over enrollment
    assert cfg.bundle == tmp_path / "b"  # relative to the file
    assert cfg.device_id == "cam-1" and cfg.profile == "jetson-orin-nano-8gb"
    assert cfg.compute_threads == 2  # default
    cfg = load_config({}, env={"TANDEM_DEVICE_ID": "from-env", "TANDEM_CONFIG": str(f)})
    assert cfg.device_id == "from-env" and cfg.api_port == 9001


@pytest.mark.parametrize("options,env,match", [
    ({"api_port": "x"}, {}, "--api-port: expected an integer"),
    ({}, {"TANDEM_DEADLINE_MS": "soon"}, "TANDEM_DEADLINE_MS: expected a number"),
    ({}, {"TANDEM_ADVERTISE": "maybe"}, "TANDEM_ADVERTISE: expected true or false"),
    ({"api_port": 70000}, {}, "api_port must be in"),
    ({"mode": "split:x"}, {}, "mode must be auto, local, cloud, cascade or split"),
    ({"broker": "http://x"}, {}, "scheme must be mqtt, mqtts, nats or tls"),
    ({"device_id": "a/b"}, {}, "device_id must not contain"),
    ({"profile_shapes": "x=1xq"}, {}, "NAME=DxDx"),
    ({"hysteresis": 1.5}, {}, r"hysteresis must be in \[0, 1\)"),
])
def test_bad_values_are_one_line_errors(options, env, match):
    with pytest.raises(InvalidArgument, match=match) as info:
        load_config({"device_id": "cam", **options}, env=env)
    assert "\n" not in str(info.value)


def test_a_device_id_is_required():
    with pytest.raises(InvalidArgument, match="no device id"):
        load_config({}, env={})


def test_file_errors(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        load_config({"device_id": "c"}, env={}, config_file=tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[edge\n")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_config({"device_id": "c"}, env={}, config_file=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[edge]\napi_prot = 1\n")
    with pytest.raises(InvalidArgument, match=r"unknown key\(s\) \['api_prot'\]"):
        load_config({"device_id": "c"}, env={}, config_file=unknown)
    typed = tmp_path / "typed.toml"
    typed.write_text("api_port = 'eighty'\n")
    with pytest.raises(InvalidArgument, match=r"typed\.toml: api_port: expected an integer"):
        load_config({"device_id": "c"}, env={}, config_file=typed)


def test_parsers():
    assert parse_mode("auto") == ("auto", None)
    assert parse_mode("split:12") == ("split", 12)
    for bad in ("split:", "split:-1", "SPLIT:1", 3, None, "split:1:2"):
        with pytest.raises(InvalidArgument):
            parse_mode(bad)
    assert parse_shapes("a=1x3x64x64, b=1x4") == {"a": (1, 3, 64, 64), "b": (1, 4)}


def test_state_dir_default_is_per_device(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load_config({"device_id": "cam-9"}, env={})
    assert cfg.resolved_state_dir() == Path(tmp_path) / "tandem" / "edge" / "cam-9"
