"""``tandem compile``, ``tandem inspect``, ``tandem keygen`` and ``tandem example``.

Light at import (click only): onnx, onnxruntime and rich load inside the commands, so ``--help``
works on a core install and a missing extra is reported by name.

Every file the user names is checked before any work starts (a 20 s compile never ends in "no
such key file"). Outputs follow one rule, whatever their kind: an existing output is refused
unless ``--overwrite``, and ``--overwrite`` replaces only what the command itself writes there —
``compile``: a Tandem bundle (a directory with a bundle manifest, an empty directory, or a
bundle archive), never the current directory or one of its parents, nor a directory holding an
input; ``keygen``: a PEM key file; ``example``: an ONNX model. Anything else is refused with one
line, ``error: …`` (exit 1), and nothing is deleted.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import click

from tandem.compiler._cascade_cli import FLAGS as CASCADE_FLAGS
from tandem.compiler._cascade_cli import cascade_options

__all__ = ["compile_command", "example_command", "inspect_command", "keygen_command"]


def _share(part: int, total: int) -> str:
    """``part`` of ``total`` as a percentage; exactly 0 and all show 0% and 100%, and a real
    split never rounds to either (<1%, >99%)."""
    if total <= 0:
        return "-"
    pct = 100 * part / total
    if 0 < part < total and round(pct) in (0, 100):
        return "<1%" if pct < 50 else ">99%"
    return f"{pct:.0f}%"


def _cut_shares(head_flops: int, tail_flops: int) -> tuple[str, str]:
    """A cut's head and tail shares of its own work (head + tail): the all-local cut is 100% /
    0% and cut 0 is 0% / 100% exactly, whatever the model's total counts besides."""
    total = head_flops + tail_flops
    return _share(head_flops, total), _share(tail_flops, total)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _err(e: float | None) -> str:
    if e is None:
        return "-"
    return "0" if e == 0 else f"{e:.1e}"


# --- outputs and inputs: checked before any work ---------------------------------------------

# An output name decides the form: a directory, or an archive by its suffix (compression).
_ARCHIVES = ((".tar.zst", "zstd"), (".tar.gz", "gzip"), (".tar", "none"))
_NOT_WRITTEN = (".zip", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z", ".rar", ".gz",
                ".zst", ".bz2", ".xz", ".onnx")


def _output_form(out: Path) -> str | None:
    """The archive compression ``-o`` asks for, or None for a bundle directory."""
    from tandem.protocol.errors import InvalidArgument

    name = out.name.lower()
    for suffix, compression in _ARCHIVES:
        if name.endswith(suffix):
            return compression
    for suffix in _NOT_WRITTEN:
        if name.endswith(suffix):
            raise InvalidArgument(
                f"-o {out}: a bundle is written as a directory (a name without an archive "
                f"suffix) or as a .tar.zst archive (.tar.gz and .tar work too), not as {suffix}")
    return None


def _input_file(path: Path, what: str) -> None:
    """``path`` is an existing, readable regular file, or a one-line error naming it."""
    from tandem.protocol.errors import InvalidArgument, NotFound

    if not path.exists():
        raise NotFound(f"no {what} file at {path}" if what == "model"
                       else f"{what} {path}: no such file")
    if path.is_dir():
        raise InvalidArgument(f"{what} {path} is a directory, not a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InvalidArgument(f"{what} {path}: {exc.strerror or exc}") from exc


def _check_inputs(model: Path, samples: Path | None, sign_key: Path | None,
                  timing_cache: Path | None, engine_cache: Path | None) -> None:
    import zipfile

    from tandem.protocol.bundle import load_private_key
    from tandem.protocol.errors import InvalidArgument

    _input_file(model, "model")
    if samples is not None:
        _input_file(samples, "--samples")
        if not zipfile.is_zipfile(samples):
            raise InvalidArgument(f"--samples {samples}: not an .npz file (numpy.savez writes one)")
    if sign_key is not None:
        _input_file(sign_key, "--sign-key")
        load_private_key(sign_key)  # a key that cannot sign fails now, not after the compile
    if timing_cache is not None:
        if timing_cache.exists():
            _input_file(timing_cache, "--timing-cache")
        elif not timing_cache.absolute().parent.is_dir():
            raise InvalidArgument(f"--timing-cache {timing_cache}: directory "
                                  f"{timing_cache.absolute().parent} does not exist")
    if engine_cache is not None and engine_cache.exists() and not engine_cache.is_dir():
        raise InvalidArgument(f"--engine-cache {engine_cache} is not a directory")


def _check_dla(dla_core: int | None, targets) -> list[str]:
    """Refuse a DLA core no target has; the warnings for targets it does not apply to."""
    from tandem.devices.profiles import load_profiles
    from tandem.protocol.errors import InvalidArgument

    if dla_core is None:
        return []
    gpu = [t for t in targets if t.backend == "tensorrt"]

    def why_not(t) -> str:
        n = t.profile.dla_cores
        return f"{t.name} has no DLA" if n == 0 else \
            f"{t.name} has {n} DLA core{'s' if n > 1 else ''} (0-{n - 1})"

    usable = [t for t in gpu if t.profile.dla_cores > dla_core]
    if not usable:
        with_dla = [p.id for p in load_profiles().values() if p.dla_cores > dla_core]
        reason = "; ".join(why_not(t) for t in gpu) or "no TensorRT target was given"
        raise InvalidArgument(f"--dla-core {dla_core}: {reason} (profiles with DLA core "
                              f"{dla_core}: {', '.join(with_dla)})")
    return [f"--dla-core {dla_core} is used for {', '.join(t.name for t in usable)} only: "
            f"{why_not(t)}" for t in gpu if t not in usable]


def _check_output(out: Path, overwrite: bool, archive: bool, inputs: list[Path]) -> None:
    """The output may be written: its directory exists and takes files; an existing output is
    replaced only with ``--overwrite`` and only when it is a Tandem bundle (of the form asked
    for; an empty directory too) that is neither the current directory nor one of its parents
    and holds none of the inputs. Nothing is ever deleted otherwise."""
    import os
    import tempfile

    from tandem.protocol.bundle import bundle_kind
    from tandem.protocol.errors import FailedPrecondition

    parent = out.absolute().parent
    if not parent.is_dir():
        raise FailedPrecondition(f"-o {out}: directory {parent} does not exist (create it first)")
    if os.path.lexists(out):
        if not overwrite:
            raise FailedPrecondition(
                f"{out} already exists; pass --overwrite to replace it (only a Tandem bundle is "
                "ever replaced)")
        target, cwd = out.resolve(), Path.cwd().resolve()
        refuse = None
        if target == cwd:
            refuse = "it is the current directory"
        elif target in cwd.parents:
            refuse = "it is a parent of the current directory"
        elif out.is_symlink():
            refuse = "it is a symbolic link"
        for path in inputs:
            resolved = path.resolve()
            if refuse is None and (resolved == target or target in resolved.parents):
                refuse = f"it holds the input {path}"
        if refuse is None:
            kind = bundle_kind(out)
            if archive and kind != "archive":
                refuse = "it is not a Tandem bundle archive"
            elif not archive and kind != "directory" and not (
                    out.is_dir() and not any(out.iterdir())):
                refuse = ("it is a bundle archive, and -o without an archive suffix writes a "
                          "directory" if kind == "archive" else "it is not a Tandem bundle")
        if refuse:
            raise FailedPrecondition(f"--overwrite refuses to replace {out}: {refuse}")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".tandem-probe-"):
            pass
    except OSError as exc:
        raise FailedPrecondition(f"cannot write in {parent}: {exc.strerror or exc}") from exc


def _warn(err, message: str) -> None:
    from rich.text import Text

    err.print(Text.assemble(("warning:", "yellow"), " ", str(message)),
              soft_wrap=not err.is_terminal)


@click.command(name="compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, required=True, metavar="TARGET",
              help="onnxruntime, or a device profile id from 'tandem devices' (repeatable)")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="bundle directory to create, or an archive OUT.tar.zst (.tar.gz, .tar)")
@click.option("--max-cuts", default=8, show_default=True, type=click.IntRange(1, 64),
              help="split points kept (cut 0 and all-local come on top)")
@click.option("--max-frontier", default=2, show_default=True, type=click.IntRange(1, 16),
              help="most tensors a cut may send")
@click.option("--samples", type=click.Path(path_type=Path),
              help=".npz of real inputs for verification (default: seeded random)")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
              help="input shape to cost and verify at, e.g. input=1x3x640x640 (repeatable; "
                   "default: the samples' shapes)")
@click.option("--sign-key", type=click.Path(path_type=Path),
              help="ed25519 private key (PEM) to sign the manifest with")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16",
              show_default=True, help="TensorRT engine precision")
@click.option("--engines", type=click.Choice(["auto", "build", "defer"]), default="auto",
              show_default=True, help="build TensorRT engines here, or defer to the device")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="TensorRT timing cache file (reused and updated)")
@click.option("--engine-cache", type=click.Path(path_type=Path),
              help="where built TensorRT engines are kept and reused "
                   "(default: $TANDEM_ENGINE_CACHE or ~/.cache/tandem/engines)")
@click.option("--version-compatible", is_flag=True,
              help="TensorRT version-compatible engines (TensorRT >= 8.6)")
@click.option("--dla-core", type=click.IntRange(0, 1),
              help="run TensorRT parts on this DLA core (GPU fallback) where the profile has DLA")
@click.option("--name", "model_name", help="model name (default: file name)")
@click.option("--version", "model_version", default="1", show_default=True)
@click.option("--bundle-version", type=click.IntRange(0, 2**53), metavar="N",
              help="release number for rollback protection: devices refuse a bundle of this "
                   "model with a lower one (default: the compile's UTC time in seconds)")
@click.option("--seed", default=0, show_default=True, help="seed of the random samples")
@click.option("--overwrite", is_flag=True,
              help="replace an existing output (only ever a Tandem bundle)")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@cascade_options
def compile_command(model: Path, targets: tuple[str, ...], out: Path, max_cuts: int,
                    max_frontier: int, samples: Path | None, input_shapes: tuple[str, ...],
                    sign_key: Path | None,
                    precision: str, engines: str, timing_cache: Path | None,
                    engine_cache: Path | None,
                    version_compatible: bool, dla_core: int | None, model_name: str | None,
                    model_version: str, bundle_version: int | None,
                    seed: int, overwrite: bool, as_json: bool, **cascade) -> None:
    """Cut MODEL (ONNX) at good split points, verify and lower the parts, write a bundle.

    OUT is a bundle directory, or a single-file archive when it ends in .tar.zst (.tar.gz,
    .tar). An existing OUT is replaced only with --overwrite, and only if it is a Tandem bundle.

    With --cascade SMALL.onnx the bundle is a cascade: SMALL answers on the device and MODEL
    takes the inputs its escalation rule calibrated on --samples sends on.
    """
    from tandem.protocol.lazy import require

    require("onnx")
    require("onnxruntime")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from tandem.compiler._cascade import CascadeBundleFromOnnx
    from tandem.compiler._cascade_cli import parse_cascade
    from tandem.compiler._pipeline import BundleFromOnnx, CompileOptions, resolve_targets
    from tandem.compiler._shapes import parse_shape
    from tandem.console import console
    from tandem.protocol.bundle import pack

    # Everything the user gave is checked before any work.
    resolved = resolve_targets(targets)
    compression = _output_form(out)
    archive = compression is not None
    cascade_options, cascade_files = parse_cascade(**cascade)
    _check_inputs(model, samples, sign_key, timing_cache, engine_cache)
    for path, flag in cascade_files:
        _input_file(path, flag)
    notes = _check_dla(dla_core, resolved)
    if engines == "build" and any(t.backend == "tensorrt" for t in resolved):
        require("tensorrt", "tensorrt")
    inputs = [p for p in (model, samples, sign_key, timing_cache, engine_cache) if p is not None]
    inputs += [path for path, _ in cascade_files]
    _check_output(out, overwrite, archive, inputs)
    shapes = dict(_with_flags(parse_shape, text) for text in input_shapes)
    options = CompileOptions(
        targets=targets, max_cuts=max_cuts, max_frontier=max_frontier, samples=samples,
        input_shapes=shapes or None, sign_key=sign_key, precision=precision, engines=engines,
        timing_cache=timing_cache,
        engine_cache=engine_cache,
        version_compatible=version_compatible, dla_core=dla_core, model_name=model_name,
        model_version=model_version, bundle_version=bundle_version, seed=seed,
        overwrite=overwrite,
    )
    err = console(stderr=True)
    for note in notes:
        _warn(err, note)
    with warnings.catch_warnings(record=True) as caught, Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True, disable=as_json or not err.is_terminal,
    ) as bar:
        warnings.simplefilter("always")
        tasks: dict[str, Any] = {}  # stage -> rich TaskID

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        def step(dest: Path):
            if cascade_options is None:
                return BundleFromOnnx(model, dest, options, progress)
            return CascadeBundleFromOnnx(cascade["cascade"], model, dest, options,
                                         cascade_options, progress)

        if archive:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="tandem-bundle-") as tmp:
                result = _with_flags(lambda: step(Path(tmp) / "bundle")())
                assert compression is not None  # archive
                pack(Path(tmp) / "bundle", out, compression=compression, overwrite=overwrite)
                result.out_dir = out
        else:
            result = _with_flags(lambda: step(out)())
    for w in caught:
        _warn(err, f"{w.message}{_flags(w.message)}")
    if as_json:
        click.echo(json.dumps(_summary_json(result), indent=2))
        return
    _print_summary(result, out)


# CompileOptions fields -> the flags that set them: the library names fields, the CLI its flags
_FLAGS = {"input_shapes": "--input-shape NAME=DIMS", "samples": "--samples",
          "max_frontier": "--max-frontier", "max_cuts": "--max-cuts", "overwrite": "--overwrite",
          "targets": "-t/--target", "engines": "--engines defer", **CASCADE_FLAGS}


def _flags(exc: object) -> str:
    flags = [_FLAGS[o] for o in getattr(exc, "options", ()) if o in _FLAGS]
    return f" ({', '.join(flags)})" if flags else ""


def _with_flags(fn, *args):
    """Call ``fn``; a Tandem error that names CompileOptions fields gets their flags added."""
    from tandem.protocol.errors import TandemError

    try:
        return fn(*args)
    except TandemError as exc:
        exc.message += _flags(exc)
        raise


def _summary_json(result) -> dict:
    m = result.manifest
    return {
        "bundle": str(result.out_dir),
        "model": m.model_name,
        "source_digest": m.source_digest,
        "nodes": result.n_nodes,
        "total_flops": result.total_flops,
        "cuts": [
            {
                "id": r.cut.id, "frontier": list(r.cut.frontier),
                "bytes": r.bytes_by_encoding,
                "head_flops": r.cut.head_flops, "tail_flops": r.cut.tail_flops,
                "max_abs_err": {"raw": r.verification.raw.max_abs_err,
                                **{k: c.max_abs_err for k, c in r.verification.encodings.items()}},
                "encodings": list(m.allowed_encodings(r.cut.id)),
            }
            for r in result.cuts
        ],
        "dropped": [{"id": c.id, "reason": why} for c, why in result.dropped],
        "artifacts": [a.to_dict() for a in m.artifacts],
        **({"cascade": m.cascade.to_dict()} if m.cascade is not None else {}),
    }


def _print_summary(result, out: Path) -> None:
    from tandem.console import Column, console, print_lines, print_table

    m = result.manifest
    columns = [
        Column("cut", justify="right"), Column("frontier", shorten=True, min_width=14),
        Column("bytes", justify="right"), Column("fp16 bytes", justify="right", fold=4),
        Column("int8 bytes", justify="right", fold=4), Column("head", justify="right"),
        Column("tail", justify="right", fold=3), Column("err raw", justify="right", fold=2),
        Column("err fp16", justify="right", fold=1), Column("err int8", justify="right", fold=1),
        Column("encodings"),
    ]
    rows = []
    for r in result.cuts:
        v = r.verification
        enc = v.encodings
        head, tail = _cut_shares(r.cut.head_flops, r.cut.tail_flops)
        rows.append([
            str(r.cut.id), list(r.cut.frontier) or "(nothing sent)",
            _human_bytes(r.bytes_by_encoding["raw"]), _human_bytes(r.bytes_by_encoding["fp16"]),
            _human_bytes(r.bytes_by_encoding["int8"]), head, tail,
            _err(v.raw.max_abs_err if v.raw else None),
            _err(enc["fp16"].max_abs_err if "fp16" in enc else None),
            _err(enc["int8"].max_abs_err if "int8" in enc else None),
            ",".join(m.allowed_encodings(r.cut.id)) or "-",
        ])
    stdout = console()
    print_table(columns, rows, out=stdout, title=(
        f"{m.model_name}: {result.n_nodes} nodes, {result.total_flops / 1e9:.3g} GFLOP, "
        f"{len(result.cuts)} cuts"))
    print_lines("", out=stdout)
    targets = sorted({(a.target, a.device_profile, a.build_on_device) for a in m.artifacts})
    for target, profile, on_device in targets:
        where = f" for {profile}" if profile else ""
        note = " (engines built on the device from the ONNX parts)" if on_device else ""
        print_lines(f"target {target}{where}{note}", out=stdout)
    for cut, why in result.dropped:
        print_lines(f"dropped cut {cut.id}: {why}", out=stdout, style="yellow")
    if m.cascade is not None:
        from tandem.compiler._cascade_cli import print_cascade

        print_lines("", out=stdout)
        print_cascade(m, out=stdout)
        print_lines("", out=stdout)
    print_lines(f"bundle written to {out}", out=stdout)


def _head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (fewer for a short one; none if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _is_archive_file(path: Path) -> bool:
    """zstd, gzip or tar by its first bytes (what load_bundle would try to unpack)."""
    head = _head(path, 262)
    return head[:4] == b"\x28\xb5\x2f\xfd" or head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar"


def _is_onnx_model(path: Path) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    try:
        import onnx

        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not parseable as ONNX (or onnx missing): not a model we can name
        return False
    return len(model.graph.node) > 0


def _not_a_bundle(path: Path) -> None:
    """A plain file that is no archive: say what it is instead of an unpacking error."""
    from tandem.protocol.errors import InvalidArgument

    if path.is_file() and not _is_archive_file(path):
        if _is_onnx_model(path):
            raise InvalidArgument(f"{path} is an ONNX model, not a bundle; compile it into one "
                                  f"first: tandem compile {path} -t onnxruntime -o bundle")
        raise InvalidArgument(f"{path} is not a Tandem bundle (a bundle is a directory with "
                              "manifest.json, or a .tar.zst archive written by tandem compile)")


@click.command(name="inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path),
              help="refuse the bundle unless its signature verifies with this key")
@click.option("--json", "as_json", is_flag=True, help="print the manifest as JSON")
def inspect_command(bundle: Path, public_key: Path | None, as_json: bool) -> None:
    """Verify a bundle (digests, signature) and describe its cuts and artifacts."""
    from tandem.protocol.bundle import load_bundle

    if public_key is not None:
        _input_file(public_key, "--public-key")
    _not_a_bundle(bundle)
    with load_bundle(bundle, public_key=public_key) as b:
        m = b.manifest
        if as_json:
            click.echo(m.to_json())
            return
        _print_bundle(b)


def _print_bundle(b) -> None:
    from tandem.console import Column, console, print_lines, print_table

    m = b.manifest
    out = console()
    sig = ("signature verified" if b.signature_verified
           else "signed (not checked: no --public-key)" if b.signed else "unsigned")
    print_lines(f"{m.model_name} v{m.model_version}: {len(m.files)} files verified, {sig}",
                f"source digest  {m.source_digest}", f"bundle digest  {b.digest}", "", out=out)
    print_table(
        [Column(""), Column("name", shorten=True), Column("dtype"), Column("shape")],
        [[kind, s.name, s.dtype, str(list(s.shape))]
         for kind, specs in (("in", m.inputs), ("out", m.outputs)) for s in specs],
        title="inputs / outputs", out=out)
    print_lines("", out=out)
    rows = []
    for c in m.cuts:
        errs = c.verification.max_abs_err.values()
        head, tail = _cut_shares(c.head_flops, c.tail_flops)
        rows.append([
            str(c.id), [t.name for t in c.frontier] or "(nothing sent)",
            _human_bytes(c.frontier_bytes), head, tail, _err(max(errs, default=None)),
            ",".join(m.allowed_encodings(c.id)) or "-", c.head_part or "-", c.tail_part or "-",
        ])
    print_table(
        [Column("cut", justify="right"), Column("frontier", shorten=True, min_width=14),
         Column("bytes", justify="right"), Column("head", justify="right"),
         Column("tail", justify="right", fold=3), Column("max abs err", justify="right", fold=2),
         Column("encodings"), Column("head part", shorten=True, fold=4),
         Column("tail part", shorten=True, fold=4)],
        rows, title="cuts", out=out)
    print_lines("", out=out)
    print_table(
        [Column("part", shorten=True), Column("target"), Column("profile"),
         Column("precision", fold=1), Column("path", shorten=True, fold=2),
         Column("builder", shorten=True, fold=3)],
        [[a.part, a.target, a.device_profile or "any", a.precision, a.path, a.builder]
         for a in m.artifacts],
        title="artifacts", out=out)
    if m.cascade is not None:
        from tandem.compiler._cascade_cli import print_cascade

        print_lines("", out=out)
        print_cascade(m, out=out)


def _replaceable(path: Path, overwrite: bool, what: str, is_ours) -> None:
    """An existing output: refused without --overwrite; with it, replaced only when
    ``is_ours(path)`` says it is what this command writes (``what``)."""
    import os

    from tandem.protocol.errors import FailedPrecondition

    if not path.absolute().parent.is_dir():
        raise FailedPrecondition(f"{path}: directory {path.absolute().parent} does not exist "
                                 "(create it first)")
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise FailedPrecondition(f"{path} already exists; pass --overwrite to replace it")
    if path.is_symlink() or not path.is_file() or not is_ours(path):
        raise FailedPrecondition(f"--overwrite refuses to replace {path}: it is not {what}")


def _is_pem_key(path: Path) -> bool:
    head = _head(path, 64)
    return head.startswith(b"-----BEGIN ") and b"KEY-----" in head


@click.command(name="keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
@click.argument("public_key", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="replace existing key files (PEM keys only)")
def keygen_command(private_key: Path, public_key: Path, overwrite: bool) -> None:
    """Create an ed25519 key pair for signing bundles (private key written with mode 0600)."""
    from tandem.protocol.bundle import generate_keypair
    from tandem.protocol.errors import InvalidArgument

    if private_key.absolute() == public_key.absolute():
        raise InvalidArgument("the private and the public key need two different files")
    for path in (private_key, public_key):
        _replaceable(path, overwrite, "a PEM key file", _is_pem_key)
    fingerprint = generate_keypair(private_key, public_key, overwrite=overwrite)
    click.echo(f"wrote {private_key} and {public_key} ({fingerprint})")


@click.command(name="example")
@click.argument("kind", type=click.Choice(["cnn", "residual", "unet", "multi-io",
                                           "dynamic-batch", "big", "mobilenet"]))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="replace an existing ONNX model file")
def example_command(kind: str, output: Path, overwrite: bool) -> None:
    """Write a seeded example ONNX model (for trying Tandem without a model at hand).

    Missing parent directories of OUTPUT are created."""
    import os
    import tempfile

    from tandem.protocol.lazy import require

    onnx: Any = require("onnx")
    from tandem.compiler import examples as _examples

    build: Any = {"cnn": _examples.cnn_chain, "residual": _examples.residual,
             "unet": _examples.unet, "multi-io": _examples.multi_io,
             "dynamic-batch": _examples.dynamic_batch, "big": _examples.big_model,
             "mobilenet": _examples.mobilenet}[kind]
    output.absolute().parent.mkdir(parents=True, exist_ok=True)
    _replaceable(output, overwrite, "an ONNX model", _is_onnx_model)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.absolute().parent)
    os.close(fd)
    try:
        onnx.save_model(build(), tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    click.echo(f"wrote {output}")
