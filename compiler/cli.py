"""``tandem compile``, ``tandem inspect``, ``tandem keygen`` and ``tandem example``.

Light at import (click only): onnx, onnxruntime and rich load inside the commands, so ``--help``
works on a core install and a missing extra is reported by name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

__all__ = ["compile_command", "example_command", "inspect_command", "keygen_command"]


def _share(part: int, total: int) -> str:
    if total <= 0:
        return "-"
    pct = 100 * part / total
    if 0 < part < total and round(pct) in (0, 100):  # never show 0% or 100% of a real split
        return "<1%" if pct < 50 else ">99%"
    return f"{pct:.0f}%"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


@click.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, required=True, metavar="TARGET",
              help="onnxruntime, or a device profile id from 'tandem devices' (repeatable)")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="bundle directory to create (or .tar.zst archive)")
@click.option("--max-cuts", default=8, show_default=True, type=click.IntRange(1, 64),
              help="split points kept (cut 0 and all-local come on top)")
@click.option("--max-frontier", default=2, show_default=True, type=click.IntRange(1, 16),
              help="most tensors a cut may send")
@click.option("--samples", type=click.Path(dir_okay=False, path_type=Path),
              help=".npz of real inputs for verification (default: seeded random)")
@click.option("--sign-key", type=click.Path(dir_okay=False, path_type=Path),
              help="ed25519 private key (PEM) to sign the manifest with")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16",
              show_default=True, help="TensorRT engine precision")
@click.option("--engines", type=click.Choice(["auto", "build", "defer"]), default="auto",
              show_default=True, help="build TensorRT engines here, or defer to the device")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache file (reused and updated)")
@click.option("--engine-cache", type=click.Path(file_okay=False, path_type=Path),
              help="where built TensorRT engines are kept and reused "
                   "(default: $TANDEM_ENGINE_CACHE or ~/.cache/tandem/engines)")
@click.option("--version-compatible", is_flag=True,
              help="TensorRT version-compatible engines (TensorRT >= 8.6)")
@click.option("--dla-core", type=click.IntRange(0, 1),
              help="run TensorRT parts on this DLA core (GPU fallback) where the profile has DLA")
@click.option("--name", "model_name", help="model name (default: file name)")
@click.option("--version", "model_version", default="1", show_default=True)
@click.option("--seed", default=0, show_default=True, help="seed of the random samples")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def compile_command(model: Path, targets: tuple[str, ...], out: Path, max_cuts: int,
                    max_frontier: int, samples: Path | None, sign_key: Path | None,
                    precision: str, engines: str, timing_cache: Path | None,
                    engine_cache: Path | None,
                    version_compatible: bool, dla_core: int | None, model_name: str | None,
                    model_version: str,
                    seed: int, overwrite: bool, as_json: bool) -> None:
    """Cut MODEL (ONNX) at good split points, verify and lower the parts, write a bundle."""
    from tandem.protocol.lazy import require

    require("onnx")
    require("onnxruntime")
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tandem.compiler._pipeline import BundleFromOnnx, CompileOptions, resolve_targets
    from tandem.protocol.bundle import pack

    resolve_targets(targets)  # fail on an unknown target before any work
    archive = out.name.endswith((".tar.zst", ".tar.gz", ".tar"))
    if archive and out.exists() and not overwrite:
        raise click.UsageError(f"{out} already exists (use --overwrite)")
    options = CompileOptions(
        targets=targets, max_cuts=max_cuts, max_frontier=max_frontier, samples=samples,
        sign_key=sign_key, precision=precision, engines=engines, timing_cache=timing_cache,
        engine_cache=engine_cache,
        version_compatible=version_compatible, dla_core=dla_core, model_name=model_name,
        model_version=model_version, seed=seed, overwrite=overwrite,
    )
    err = Console(stderr=True)
    with warnings.catch_warnings(record=True) as caught, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True, disable=as_json or not err.is_terminal,
    ) as bar:
        warnings.simplefilter("always")
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        if archive:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="tandem-bundle-") as tmp:
                result = BundleFromOnnx(model, Path(tmp) / "bundle", options, progress)()
                pack(Path(tmp) / "bundle", out, overwrite=overwrite)
        else:
            result = BundleFromOnnx(model, out, options, progress)()
    for w in caught:
        err.print(f"[yellow]warning:[/yellow] {w.message}")
    if as_json:
        click.echo(json.dumps(_summary_json(result), indent=2))
        return
    _print_summary(result, out)


def _summary_json(result) -> dict:
    return {
        "bundle": str(result.out_dir),
        "model": result.manifest.model_name,
        "source_digest": result.manifest.source_digest,
        "nodes": result.n_nodes,
        "total_flops": result.total_flops,
        "cuts": [
            {
                "id": r.cut.id, "frontier": list(r.cut.frontier),
                "bytes": r.bytes_by_encoding,
                "head_flops": r.cut.head_flops, "tail_flops": r.cut.tail_flops,
                "max_abs_err": {"raw": r.verification.raw.max_abs_err,
                                **{k: c.max_abs_err for k, c in r.verification.encodings.items()}},
                "encodings": list(r.verification.usable_encodings),
            }
            for r in result.cuts
        ],
        "dropped": [{"id": c.id, "reason": why} for c, why in result.dropped],
        "artifacts": [a.to_dict() for a in result.manifest.artifacts],
    }


def _print_summary(result, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = result.manifest
    table = Table(title=f"{m.model_name}: {result.n_nodes} nodes, "
                        f"{result.total_flops / 1e9:.3g} GFLOP, {len(result.cuts)} cuts")
    for col in ("cut", "frontier", "fp32", "fp16", "int8", "head", "tail", "err raw",
                "err fp16", "err int8", "encodings"):
        table.add_column(col, overflow="fold")
    total = result.total_flops
    for r in result.cuts:
        v = r.verification
        enc = v.encodings
        frontier = ", ".join(r.cut.frontier) if r.cut.frontier else "(nothing sent)"
        table.add_row(
            str(r.cut.id), frontier,
            _human_bytes(r.bytes_by_encoding["raw"]), _human_bytes(r.bytes_by_encoding["fp16"]),
            _human_bytes(r.bytes_by_encoding["int8"]),
            _share(r.cut.head_flops, total), _share(r.cut.tail_flops, total),
            _err(v.raw.max_abs_err if v.raw else None),
            _err(enc["fp16"].max_abs_err if "fp16" in enc else None),
            _err(enc["int8"].max_abs_err if "int8" in enc else None),
            ",".join(v.usable_encodings),
        )
    console.print(table)
    targets = sorted({(a.target, a.device_profile, a.build_on_device) for a in m.artifacts})
    for target, profile, on_device in targets:
        where = f" for {profile}" if profile else ""
        note = " (engines built on the device from the ONNX parts)" if on_device else ""
        console.print(f"target {target}{where}{note}")
    for cut, why in result.dropped:
        console.print(f"[yellow]dropped cut {cut.id}:[/yellow] {why}")
    console.print(f"bundle written to {out}")


@click.command(name="inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path),
              help="refuse the bundle unless its signature verifies with this key")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def inspect_command(bundle: Path, public_key: Path | None, as_json: bool) -> None:
    """Verify a bundle (digests, signature) and describe its cuts and artifacts."""
    from tandem.protocol.bundle import load_bundle

    with load_bundle(bundle, public_key=public_key) as b:
        m = b.manifest
        if as_json:
            click.echo(m.to_json())
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        sig = ("signature verified" if b.signature_verified
               else "signed (not checked: no --public-key)" if b.signed else "unsigned")
        console.print(f"[bold]{m.model_name}[/bold] v{m.model_version}  source "
                      f"{m.source_digest[:16]}…  bundle {b.digest[:16]}…  {len(m.files)} files "
                      f"verified, {sig}")
        io = Table(title="inputs / outputs")
        for col in ("", "name", "dtype", "shape"):
            io.add_column(col)
        for kind, specs in (("in", m.inputs), ("out", m.outputs)):
            for s in specs:
                io.add_row(kind, s.name, s.dtype, str(list(s.shape)))
        console.print(io)
        total = max(1, sum((m.cuts[0].tail_flops, m.cuts[0].head_flops)) if m.cuts else 1)
        cuts = Table(title="cuts")
        for col in ("cut", "frontier", "bytes (fp32)", "head", "tail", "max abs err",
                    "encodings", "head part", "tail part"):
            cuts.add_column(col, overflow="fold")
        for c in m.cuts:
            errs = c.verification.max_abs_err.values()
            cuts.add_row(
                str(c.id), ", ".join(t.name for t in c.frontier) or "(nothing sent)",
                _human_bytes(c.frontier_bytes), _share(c.head_flops, total),
                _share(c.tail_flops, total), _err(max(errs, default=None)),
                ",".join(("raw", *m.allowed_encodings(c.id))) if c.verification.passed else "-",
                c.head_part or "-", c.tail_part or "-",
            )
        console.print(cuts)
        arts = Table(title="artifacts")
        for col in ("part", "target", "profile", "precision", "path", "builder"):
            arts.add_column(col, overflow="fold")
        for a in m.artifacts:
            arts.add_row(a.part, a.target, a.device_profile or "any", a.precision, a.path,
                         a.builder)
        console.print(arts)


@click.command(name="keygen")
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("public_key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True)
def keygen_command(private_key: Path, public_key: Path, overwrite: bool) -> None:
    """Create an ed25519 key pair for signing bundles (private key written with mode 0600)."""
    from tandem.protocol.bundle import generate_keypair

    fingerprint = generate_keypair(private_key, public_key, overwrite=overwrite)
    click.echo(f"wrote {private_key} and {public_key} ({fingerprint})")


@click.command(name="example")
@click.argument("kind", type=click.Choice(["cnn", "residual", "unet", "multi-io",
                                           "dynamic-batch", "big"]))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
def example_command(kind: str, output: Path) -> None:
    """Write a seeded example ONNX model (for trying Tandem without a model at hand)."""
    from tandem.protocol.lazy import require

    onnx = require("onnx")
    from tandem.compiler import examples as _examples

    build = {"cnn": _examples.cnn_chain, "residual": _examples.residual,
             "unet": _examples.unet, "multi-io": _examples.multi_io,
             "dynamic-batch": _examples.dynamic_batch, "big": _examples.big_model}[kind]
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build(), str(output))
    click.echo(f"wrote {output}")
