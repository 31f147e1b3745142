"""One configuration layer: options > TANDEM_* environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.cloud import CloudConfig, load_config, parse_broker
from tandem.protocol import InvalidArgument, NotFound


def test_defaults_and_precedence(tmp_path):
    cfg_file = tmp_path / "cloud.toml"
    cfg_file.write_text('[cloud]\nrepo = "bundles"\nmax_batch = 4\nmax_delay_ms = 7\n'
                        'group = "from-file"\n')
    env = {"TANDEM_MAX_BATCH": "16", "TANDEM_GROUP": "from-env"}
    cfg = load_config({"group": "from-option", "max_batch": None}, env=env,
                      config_file=cfg_file)
    assert cfg.group == "from-option"  # option beats environment
    assert cfg.max_batch == 16  # environment beats file (the option was not given)
    assert cfg.max_delay_ms == 7.0  # file beats default
    assert cfg.repo == tmp_path / "bundles"  # relative to the config file
    assert cfg.broker == "mqtt://127.0.0.1:1883" and cfg.queue_limit == 256
    assert cfg.http_port is None and cfg.inflight_limit == 32


def test_config_file_from_the_environment_and_top_level_keys(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(f'repo = "{tmp_path}"\nhttp_port = 0\n')
    cfg = load_config({}, env={"TANDEM_CONFIG": str(f), "TANDEM_HTTP_PORT": "off"})
    assert cfg.repo == tmp_path and cfg.http_port is None


@pytest.mark.parametrize(("options", "env", "toml", "match"), [
    ({}, {}, None, "no model repository"),
    ({"repo": "r"}, {"TANDEM_MAX_BATCH": "x"}, None, "TANDEM_MAX_BATCH: expected an integer"),
    ({"repo": "r"}, {"TANDEM_MAX_DELAY_MS": "nan"}, None, "finite"),
    ({"repo": "r", "max_batch": 0}, {}, None, "max_batch must be in"),
    ({"repo": "r", "broker": "http://h"}, {}, None, "scheme must be mqtt"),
    ({"repo": "r", "worker_id": "a/b"}, {}, None, "must not contain"),
    ({}, {}, '[cloud]\nrepo = "r"\nmax_bach = 3\n', "unknown key"),
    ({}, {}, "repo = [", "not valid TOML"),
    ({}, {}, '[cloud]\nrepo = "r"\nmax_batch = true\n', "max_batch: expected an integer"),
    ({}, {}, 'repo = "r"\n[cloud]\nmax_batch = 2\n', r"outside \[cloud\]"),
])
def test_bad_values_are_one_line_errors(tmp_path, options, env, toml, match):
    f = None
    if toml is not None:
        f = tmp_path / "c.toml"
        f.write_text(toml)
    with pytest.raises(InvalidArgument, match=match):
        load_config(options, env=env, config_file=f)


def test_missing_config_file(tmp_path):
    with pytest.raises(NotFound):
        load_config({"repo": "r"}, env={}, config_file=tmp_path / "none.toml")


def test_broker_urls():
    b = parse_broker("mqtts://user:p%40ss@broker.example:8884")
    assert (b.scheme, b.host, b.port, b.username, b.password, b.tls) == (
        "mqtts", "broker.example", 8884, "user", "p@ss", True)
    assert "p@ss" not in str(b)
    assert parse_broker("mqtt://h").port == 1883 and parse_broker("mqtts://h").port == 8883
    for bad in ("h:1883", "mqtt://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(InvalidArgument):
            parse_broker(bad)
    assert CloudConfig(repo=Path("r")).worker_id  # a default id from host and pid


def test_nats_broker_urls_need_ids_nats_carries():
    cfg = CloudConfig(repo=Path("r"), broker="nats://u:pw@a:4222,b", worker_id="w-1")
    assert (cfg.broker_address.scheme, cfg.broker_address.host, cfg.broker_address.port) == (
        "nats", "a", 4222)
    assert parse_broker("tls://h").tls and parse_broker("tls://h").port == 4222
    for bad in ({"worker_id": "host.example-1"}, {"group": "g.1"}, {"group": "g*"}):
        with pytest.raises(InvalidArgument, match="NATS"):
            CloudConfig(repo=Path("r"), broker="nats://a", **bad)
    CloudConfig(repo=Path("r"), broker="mqtt://a", worker_id="host.example-1")  # fine on MQTT
    assert "." not in CloudConfig(repo=Path("r"), broker="nats://a").worker_id


def test_the_mqtt_version_is_negotiated_by_default(tmp_path):
    cfg = load_config({"repo": str(tmp_path)}, env={})
    assert cfg.mqtt_version == "auto"
    f = tmp_path / "c.toml"
    f.write_text('repo = "r"\nmqtt_version = 311\n')
    assert load_config({}, env={}, config_file=f).mqtt_version == 311  # an integer in TOML
    assert load_config({"repo": "r"}, env={"TANDEM_MQTT_VERSION": "5"}).mqtt_version == 5
    assert load_config({"repo": "r", "mqtt_version": "AUTO"}, env={}).mqtt_version == "auto"
    with pytest.raises(InvalidArgument, match="--mqtt-version: expected auto, 5 or 311"):
        load_config({"repo": "r", "mqtt_version": "4"}, env={})
    with pytest.raises(InvalidArgument, match="'auto', 5 or 311"):
        CloudConfig(repo=Path("r"), mqtt_version=3)


def test_an_empty_group_serves_the_unshared_filter(tmp_path):
    from tandem.cloud._worker import Worker

    cfg = load_config({"repo": str(tmp_path), "group": ""}, env={})
    assert Worker(cfg)._filter == "tandem/v1/req/+/+"
    assert Worker(CloudConfig(repo=tmp_path))._filter == "$share/tandem/tandem/v1/req/+/+"
