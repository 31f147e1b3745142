import dataclasses
import json

import pytest

from tandem.devices.profiles import (
    DATA_FILE,
    FIGURE_FIELDS,
    KINDS,
    Profile,
    get_profile,
    load_profiles,
)
from tandem.protocol.errors import InternalError, NotFound

EXPECTED = {
    "jetson-nano", "jetson-tx2", "jetson-xavier-nx", "jetson-agx-xavier",
    "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-8gb", "jetson-orin-nx-16gb",
    "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "cloud-t4", "cloud-l4", "cloud-a10",
    "cloud-a100", "cloud-h100", "cloud-h200", "cpu-x86_64", "cpu-arm64",
}


def test_every_required_device_has_a_profile():
    assert set(load_profiles()) == EXPECTED


def test_every_profile_has_every_field_and_a_source_for_every_figure():
    raw = json.loads(DATA_FILE.read_text())["profiles"]
    names = {f.name for f in dataclasses.fields(Profile)}
    for entry in raw:
        assert set(entry) == names, entry["id"]
        for field in FIGURE_FIELDS:
            assert entry["sources"].get(field, "").strip(), (entry["id"], field)


def test_figures_agree_with_the_shared_facts():
    p = load_profiles()
    assert p["jetson-orin-nano-8gb"].dla_cores == 0  # DLA fused off on Orin Nano
    assert p["jetson-agx-orin-64gb"].int8_tops == 275 and p["jetson-agx-orin-64gb"].int8_sparse
    assert p["jetson-xavier-nx"].dla_cores == 2
    assert p["jetson-agx-xavier"].compute_capability == "7.2"
    assert {p[i].compute_capability for i in EXPECTED if "orin" in i} == {"8.7"}
    assert p["jetson-nano"].sm == "sm_53" and p["jetson-tx2"].sm == "sm_62"
    assert p["cloud-h200"].memory_gb == 141 and p["cloud-h100"].compute_capability == "9.0"


def test_kinds_backends_and_cpu_profiles_are_consistent():
    for prof in load_profiles().values():
        assert prof.kind in KINDS
        if prof.kind == "cpu":
            assert prof.compute_capability is None and prof.default_backend == "onnxruntime"
        else:
            assert prof.default_backend == "tensorrt" and prof.workspace_mb > 0


def test_profiles_are_frozen():
    prof = get_profile("cloud-t4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        prof.memory_gb = 1
    with pytest.raises(TypeError):
        prof.sources["memory_gb"] = "x"


def test_unknown_profile_names_close_matches():
    with pytest.raises(NotFound) as err:
        get_profile("jetson-orin-nano")
    assert "jetson-orin-nano-8gb" in str(err.value)


def _write(tmp_path, profiles):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 1, "profiles": profiles}))
    return path


def test_validation_rejects_a_missing_source(tmp_path):
    entry = get_profile("cloud-l4").to_dict()
    del entry["sources"]["int8_tops"]
    with pytest.raises(InternalError, match="no source"):
        load_profiles(_write(tmp_path, [entry]))


def test_validation_rejects_a_missing_field_bad_kind_and_duplicates(tmp_path):
    entry = get_profile("cloud-l4").to_dict()
    missing = dict(entry)
    del missing["dla_cores"]
    with pytest.raises(InternalError, match="missing fields"):
        load_profiles(_write(tmp_path, [missing]))
    with pytest.raises(InternalError, match="kind"):
        load_profiles(_write(tmp_path, [dict(entry, kind="tpu")]))
    with pytest.raises(InternalError, match="duplicate"):
        load_profiles(_write(tmp_path, [entry, entry]))
    with pytest.raises(InternalError, match="type"):
        load_profiles(_write(tmp_path, [dict(entry, memory_gb="24")]))
