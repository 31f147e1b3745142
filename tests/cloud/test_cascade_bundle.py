"""The cloud endpoint serves the large model of a cascade bundle (issue #17): a real mosquitto
and worker; an escalation is cloud-only (cut 0) or split at an interior cut of the large model,
and the small model is never loaded in the cloud."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.cloud import ModelRepository
from tandem.compiler import CascadeBundleFromOnnx, CascadeOptions, CompileOptions
from tandem.protocol import MqttTransport, SyncTransport, TransportConfig
from tandem.protocol.bundle import load_bundle
from tests._support.cascade import make_pair, save
from tests.cloud.conftest import broker_url, request_for, topic_for


@pytest.fixture(scope="module")
def cascade_repo(tmp_path_factory):
    pair = make_pair(0)
    d = tmp_path_factory.mktemp("cascade-cloud")
    np.savez(d / "s.npz", x=pair.rows(400, 1))
    repo = d / "repo"
    repo.mkdir()
    CascadeBundleFromOnnx(save(pair.small, d / "small.onnx"), save(pair.large, d / "large.onnx"),
                          repo / "digits", CompileOptions(samples=d / "s.npz"),
                          CascadeOptions(escalation_rate=0.2))()
    return pair, repo


def test_the_repository_indexes_the_large_models_cuts_only(cascade_repo):
    _, repo = cascade_repo
    r = ModelRepository(repo)
    try:
        r.scan()
        (entry,) = r.entries
        m = entry.manifest
        assert m.cascade is not None
        tails = {cut.id for cut in m.cuts if cut.tail_part is not None}
        assert set(entry.parts) == tails and 0 in tails and len(tails) >= 2
        assert all(m.cascade.small_part not in part.needs for part in entry.parts.values())
    finally:
        r.close()


@pytest.mark.broker
def test_a_worker_answers_escalations_cloud_only_and_split(mosquitto, run_worker,
                                                           cascade_repo):
    pair, repo = cascade_repo
    run_worker(repo=repo, broker=broker_url(mosquitto))
    bundle = repo / "digits"
    with load_bundle(bundle) as b:
        cuts = [c.id for c in b.manifest.cuts if c.tail_part is not None]
    x = pair.rows(3, 7)
    want = pair.large_logits(x)
    assert not np.allclose(want, pair.small_logits(x), atol=1e-3)
    transport = SyncTransport(MqttTransport(TransportConfig(host="127.0.0.1",
                                                            port=mosquitto.port)))
    with transport as t:
        for cut in cuts:
            request, _ = request_for(bundle, cut, {"x": x})
            response = t.request(topic_for(request, "digits"), request)
            got = {o.name: o.to_array() for o in response.outputs}
            np.testing.assert_allclose(got["logits"], want, rtol=1e-4, atol=1e-4,
                                       err_msg=f"cut {cut}")
