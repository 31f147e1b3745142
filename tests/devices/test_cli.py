import json
import re

from click.testing import CliRunner

from tandem.devices.cli import devices_command
from tandem.devices.profiles import load_profiles
from tests._support.terminal import into_head, on_terminal, piped, stdout_closed


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


# --- as a user meets it: piped, on an 80-column terminal, detection in words --------------------


def _profile_values(p) -> list[str]:
    from tandem.devices.cli import _fmt

    return [p.id, p.kind, p.compute_capability or "-", _fmt(p.memory_gb, " GB"),
            _fmt(p.fp16_tflops, sparse=p.fp16_sparse), _fmt(p.int8_tops, sparse=p.int8_sparse),
            str(p.dla_cores), p.default_backend]


def test_piped_table_loses_nothing():
    proc = piped(["devices"], TANDEM_DEVICE_PROFILE="cloud-h100")
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    title, header, *rows, footnote = proc.stdout.splitlines()
    assert title == "Tandem device profiles" and header.split()[:2] == ["id", "kind"]
    table = {}
    for row in rows:  # a one-character marker column, then two spaces, then the values
        cells = re.split(r"\s{2,}", row[3:].strip())
        table[cells[0]] = (row[0], cells)
    assert set(table) == set(load_profiles())
    for p in load_profiles().values():  # every value of every profile, in full, in its row
        assert table[p.id] == ("*" if p.id == "cloud-h100" else " ", _profile_values(p))
    assert footnote == "* detected: cloud-h100 (by env: TANDEM_DEVICE_PROFILE=cloud-h100)"


def test_table_fits_80_columns_on_a_terminal():
    from rich.cells import cell_len

    rc, shown, err = on_terminal(["devices", "--profile", "jetson-agx-orin-64gb"], columns=80)
    assert rc == 0, err
    lines = shown.splitlines()
    assert max(cell_len(ln) for ln in lines) <= 80, shown
    assert "…" not in shown  # no value cut: a column is left out instead, and said so
    assert "left out: backend" in " ".join(shown.split())
    for p in load_profiles().values():
        row = next(ln for ln in lines if f" {p.id} " in f" {ln} ")
        for value in _profile_values(p)[:-1]:  # all but the folded backend column
            assert value in row, (value, row)
    rc, wide, _ = on_terminal(["devices"], columns=120)
    assert rc == 0 and "left out" not in wide and "onnxruntime" in wide


def test_detect_never_shows_a_raw_exception(monkeypatch):
    import importlib

    detect = importlib.import_module("tandem.devices.detect")  # the module, not the function
    monkeypatch.delenv("TANDEM_DEVICE_PROFILE", raising=False)
    monkeypatch.setattr(detect, "_read", lambda path: None)  # not a Jetson

    def no_driver(cmd, timeout):
        raise FileNotFoundError(2, "No such file or directory", "nvidia-smi")

    monkeypatch.setattr(detect, "_run", no_driver)
    out = CliRunner().invoke(devices_command, ["--detect"])
    assert out.exit_code == 0, out.output
    assert "no NVIDIA driver (nvidia-smi not found)" in out.output
    assert "Error" not in out.output  # FileNotFoundError, TimeoutExpired, …


def test_a_closed_stdout_is_a_normal_end():
    for args in (["devices"], ["devices", "--json"], ["devices", "--detect"]):
        assert stdout_closed(args) == (0, "")
    rc, first, err = into_head(["devices"])
    assert (rc, err) == (0, "") and first.startswith("Tandem device profiles")
