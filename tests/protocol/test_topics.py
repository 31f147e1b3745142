from __future__ import annotations

import pytest

from tandem.protocol import topics
from tandem.protocol.errors import Code, InvalidArgument
from tandem.protocol.topics import (
    MAX_ID_LEN,
    assign_topic,
    load_topic,
    parse_assign_topic,
    parse_load_topic,
    parse_request_topic,
    parse_response_topic,
    parse_status_topic,
    request_filter,
    request_topic,
    response_topic,
    status_topic,
    validate_id,
)


def test_topics_are_the_ones_in_the_design():
    assert request_topic("cam-01", "resnet50") == "tandem/v1/req/cam-01/resnet50"
    assert response_topic("cam-01") == "tandem/v1/resp/cam-01"
    assert status_topic("cam-01") == "tandem/v1/status/cam-01"
    assert load_topic("w-3") == "tandem/v1/cloud/w-3/load"
    assert assign_topic("cam-01") == "tandem/v1/assign/cam-01"
    assert request_filter() == "tandem/v1/req/+/+"
    assert request_filter(None) == "tandem/v1/req/+/+"
    assert request_filter("workers") == "$share/workers/tandem/v1/req/+/+"


def test_parsers_invert_the_builders():
    assert parse_request_topic(request_topic("cam-01", "m.v2")) == ("cam-01", "m.v2")
    assert parse_request_topic(b"tandem/v1/req/d/m") == ("d", "m")
    assert parse_response_topic(response_topic("d")) == "d"
    assert parse_status_topic(status_topic("d")) == "d"
    assert parse_load_topic(load_topic("w")) == "w"
    assert parse_assign_topic(assign_topic("d")) == "d"
    assert parse_request_topic(request_topic("kamera-ü", "模型")) == ("kamera-ü", "模型")


@pytest.mark.parametrize("topic", [
    "tandem/v1/req/cam-01",
    "tandem/v1/req/cam-01/m/extra",
    "tandem/v2/req/cam-01/m",
    "tandem/v1/resp/cam-01/m",
    "tandem/v1/req//m",
    "tandem/v1/req/+/m",
    "tandem/v1/req/$sys/m",
    "",
    b"tandem/v1/req/\xff/m",
    42,
])
def test_parse_request_topic_rejects_others(topic):
    with pytest.raises(InvalidArgument) as info:
        parse_request_topic(topic)
    assert info.value.code is Code.INVALID_ARGUMENT


def test_parse_load_topic_needs_the_load_suffix():
    with pytest.raises(InvalidArgument):
        parse_load_topic("tandem/v1/cloud/w/status")


@pytest.mark.parametrize("bad", [
    "", "a/b", "a+b", "a#", "+", "#", "a\x00b", "\x00", "$SYS", "$share", "a\nb", "a\x7fb",
    "x" * (MAX_ID_LEN + 1), "é" * (MAX_ID_LEN // 2 + 1), "\udcff", b"\xff\xfe", None, 5,
])
def test_validate_id_rejects(bad):
    with pytest.raises(InvalidArgument, match="my_id"):
        validate_id(bad, "my_id")


@pytest.mark.parametrize("good", ["cam-01", "a", "x" * MAX_ID_LEN, "é" * (MAX_ID_LEN // 2),
                                  "a$b", "a b", "Jetson_Orin.nano"])
def test_validate_id_accepts(good):
    assert validate_id(good) == good


# What MQTT 5 §1.5.4 lets a broker refuse (mosquitto does: a SUBSCRIBE or PUBLISH holding one
# of these is a malformed packet; tests/security/test_wire_ids.py replays them on a real broker).
BROKER_REFUSED = [
    "cam\u0085",  # C1 control (NEL)
    "cam\u0080", "cam\u009f",  # both ends of the C1 block
    "cam\u0001", "cam\u001f", "cam\x7f",  # C0 controls and DEL
    "cam\ufdd0", "cam\ufdef",  # the noncharacter block U+FDD0..U+FDEF
    "cam\ufffe", "cam\uffff",  # U+xFFFE / U+xFFFF on the BMP...
    "cam\U0001fffe", "cam\U0010ffff",  # ...and on every other plane
]


@pytest.mark.parametrize("bad", BROKER_REFUSED)
def test_validate_id_refuses_what_brokers_refuse(bad):
    with pytest.raises(InvalidArgument, match="device_id") as info:
        validate_id(bad, "device_id")
    assert f"U+{ord(bad[-1]):04X}" in str(info.value)  # names the character
    with pytest.raises(InvalidArgument):
        response_topic(bad)
    with pytest.raises(InvalidArgument):
        parse_request_topic(f"tandem/v1/req/{bad}/m")
    with pytest.raises(InvalidArgument):
        validate_id(bad.encode("utf-8"), "device_id")


@pytest.mark.parametrize("good", [
    "cam\u00a0",  # NO-BREAK SPACE: right after the C1 block
    "cam\ufdcf", "cam\ufdf0",  # just outside the noncharacter block
    "cam\ufffd",  # REPLACEMENT CHARACTER
    "cam\U0001fffd", "cam\U0010fffd", "\U0001f4f7-01",  # astral planes, emoji
])
def test_validate_id_accepts_the_neighbours(good):
    assert validate_id(good) == good


def test_refused_character_is_the_rule_alone():
    assert topics.refused_character("tandem/v1/resp/cam-01") is None
    assert topics.refused_character("a/b\u0085/c\ufdd0") == "\u0085"
    assert topics.refused_character("x\U0003ffff") == "\U0003ffff"


def test_builders_validate_their_ids():
    for build in (response_topic, status_topic, load_topic, assign_topic):
        with pytest.raises(InvalidArgument):
            build("a/b")
    with pytest.raises(InvalidArgument, match="model"):
        request_topic("cam", "m/x")
    with pytest.raises(InvalidArgument, match="shared_group"):
        request_filter("g+")


def test_public_surface():
    assert "validate_id" in topics.__all__ and "request_filter" in topics.__all__
    assert all(hasattr(topics, name) for name in topics.__all__)
