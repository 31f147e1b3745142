"""``tandem cloud …``: the cloud endpoint's commands (loaded by the ``tandem`` dispatcher)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["cloud_command"]


@click.group(name="cloud", context_settings={"help_option_names": ["-h", "--help"]})
def cloud_command() -> None:
    """The cloud endpoint: workers that run bundle tails for devices over MQTT."""


def _opt(*names: str, **kw):  # every option defaults to "not given" so the layers can merge
    return click.option(*names, default=None, show_default=False, **kw)


@cloud_command.command(name="serve", context_settings={"max_content_width": 100})
@_opt("--repo", type=click.Path(path_type=Path), metavar="DIR",
      help="model repository: bundle directories and .tar.zst archives  [env TANDEM_REPO]")
@_opt("--broker", metavar="URL",
      help="mqtt[s]://[user[:password]@]HOST[:PORT], or nats://HOST[:PORT][,HOST[:PORT]…] "
      "for a NATS cluster (tls:// with TLS)  [default: mqtt://127.0.0.1:1883]")
@_opt("--group", metavar="NAME",
      help="shared-subscription group ('' for none: a single worker, on brokers without "
           "shared subscriptions)  [default: tandem]")
@_opt("--worker-id", metavar="ID", help="this worker's id  [default: <host>-<pid>]")
@_opt("--max-batch", type=int, metavar="N", help="rows per batch  [default: 8]")
@_opt("--max-delay-ms", type=float, metavar="MS",
      help="longest wait for a batch to fill  [default: 2]")
@_opt("--queue-limit", type=int, metavar="N",
      help="queued requests before RESOURCE_EXHAUSTED  [default: 256]")
@_opt("--http-port", type=int, metavar="P",
      help="HTTP port for health, metrics, KServe v2 and bundles (0: any free port)  "
           "[default: off]")
@_opt("--http-host", metavar="ADDR", help="HTTP listen address  [default: 127.0.0.1]")
@_opt("--public-key", type=click.Path(path_type=Path), metavar="FILE",
      help="refuse bundles not signed by this ed25519 key (PEM)")
@_opt("--enroll", type=click.Path(path_type=Path), metavar="FILE",
      help="fleet enrollment file (tandem fleet add-worker): worker id, broker, client "
           "certificate or password, CA, bundle-signing key  [env TANDEM_ENROLL]")
@_opt("--memory-budget-mb", type=int, metavar="MB",
      help="loaded parts beyond this are unloaded, least recently used first  [default: 4096]")
@_opt("--compute-threads", type=int, metavar="N",
      help="batches computing at once  [default: 1]")
@_opt("--intra-op-threads", type=int, metavar="N",
      help="ONNX Runtime threads per part (0: its default)  [default: 0]")
@_opt("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]),
      help="auto: TensorRT engines (built in the background) where tensorrt imports and the "
           "bundle has an engine or recipe for this GPU, else ONNX Runtime (CUDA, else CPU)  "
           "[default: auto]")
@_opt("--profile", metavar="ID", help="device profile of this machine  [default: detected]")
@_opt("--engine-cache", type=click.Path(path_type=Path), metavar="DIR",
      help="where built TensorRT engines are kept  [default: ~/.cache/tandem/engines]")
@_opt("--mqtt-version", type=click.Choice(["auto", "5", "311"]),
      help="MQTT protocol; auto tries 5, then 3.1.1  [default: auto]")
@_opt("--config", "config_file", type=click.Path(path_type=Path), metavar="FILE",
      help="TOML file with any of these options (keys as the option names with _, in a "
           "[cloud] table)  [env TANDEM_CONFIG]")
@_opt("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
      help="[default: info]")
def serve_command(config_file: Path | None, **options: object) -> None:
    """Serve the bundles of a model repository to devices over MQTT (and HTTP).

    Every option can also come from the environment (TANDEM_<OPTION>, e.g. TANDEM_MAX_BATCH)
    or the config file; precedence: option > environment > config file > default. More
    settings, file and environment only: max_inflight (unstarted requests taken from the
    broker), repo_poll_s, dedup_window_s, dedup_max_mb, load_interval_s, drain_timeout_s,
    username, password, ca_file, cert_file, key_file. SIGTERM or SIGINT drains the queue, then
    disconnects.
    """
    import logging
    import tempfile

    from tandem.cloud._config import load_config
    from tandem.cloud._repository import check_repo
    from tandem.cloud._serve import serve

    # an enrollment's PEMs live here while the worker runs (0700, removed on exit)
    with tempfile.TemporaryDirectory(prefix="tandem-cloud-") as secrets:
        config = load_config(options, config_file=config_file, secrets_dir=Path(secrets))
        check_repo(config.repo)
        logging.basicConfig(level=config.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        serve(config)
