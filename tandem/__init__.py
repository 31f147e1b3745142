"""Tandem: an edge-cloud hybrid inference runtime.

One import root for the whole distribution (``pip install tandem-rt`` claims only ``tandem``):

* :mod:`tandem.protocol` — wire messages, tensors, chunking, topics, errors, the MQTT transport,
  the bundle format (imports no other package of ours);
* :mod:`tandem.devices` — device profiles, detection, execution backends;
* :mod:`tandem.compiler` — ONNX in, verified split bundle out;
* :mod:`tandem.edge` — the on-device daemon;
* :mod:`tandem.cloud` — the cloud fallback endpoint;
* :mod:`tandem.cli` — the ``tandem`` command.

The folders stay at the top of the repository (``protocol/``, ``devices/`` …); pyproject.toml
maps them under this package. Importing ``tandem`` imports none of them.
"""

__all__: list[str] = []
