import json

from click.testing import CliRunner

from tandem.devices.cli import devices_command
from tandem.devices.profiles import load_profiles


def test_json_lists_every_profile_and_the_detected_one(monkeypatch):
    monkeypatch.setenv("TANDEM_DEVICE_PROFILE", "cloud-l4")
    out = CliRunner().invoke(devices_command, ["--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["detected"] == "cloud-l4" and doc["source"] == "env"
    assert {p["id"] for p in doc["profiles"]} == set(load_profiles())


def test_detect_prints_the_profile(monkeypatch):
    monkeypatch.delenv("TANDEM_DEVICE_PROFILE", raising=False)
    out = CliRunner().invoke(devices_command, ["--detect", "--profile", "jetson-orin-nx-16gb"])
    assert out.exit_code == 0 and out.output.startswith("jetson-orin-nx-16gb\t")
    out = CliRunner().invoke(devices_command, ["--detect", "--json", "--profile", "cloud-t4"])
    assert json.loads(out.output)["profile"]["compute_capability"] == "7.5"


def test_table_marks_the_detected_device(monkeypatch):
    monkeypatch.setenv("TANDEM_DEVICE_PROFILE", "jetson-agx-orin-64gb")
    out = CliRunner().invoke(devices_command, [], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if "jetson-agx-orin-64gb" in ln)
    assert "*" in line and "275 (sparse)" in line
    assert "detected: jetson-agx-orin-64gb" in out.output


def test_unknown_profile_is_an_error(monkeypatch):
    out = CliRunner().invoke(devices_command, ["--profile", "cloud-x9"])
    assert out.exit_code != 0 and "cloud-x9" in str(out.exception)
