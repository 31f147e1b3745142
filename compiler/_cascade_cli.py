"""The cascade side of ``tandem compile`` (``--cascade SMALL.onnx``) and ``tandem inspect``.

Light at import (click only), like :mod:`tandem.compiler.cli`, which applies
:func:`cascade_options` to ``compile`` and calls the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["FLAGS", "cascade_json", "cascade_options", "parse_cascade", "print_cascade"]

#: CascadeOptions fields -> the flags that set them (errors and warnings name the fields)
FLAGS = {"rule": "--rule", "scorer": "--rule", "output": "--rule-output",
         "output_map": "--output-map LARGE=SMALL", "agreement": "--agreement",
         "escalation_rate": "--escalation-rate", "labels": "--labels"}

_RULES = {"max-softmax": "max_softmax", "max_softmax": "max_softmax", "margin": "margin",
          "entropy": "entropy"}


def cascade_options(fn):
    """The cascade options of ``tandem compile``; the command receives them as keyword
    arguments (``cascade``, ``rule``, ``rule_output``, ``output_map``, ``agreement``,
    ``escalation_rate``, ``labels``)."""
    options = [
        click.option("--cascade", "cascade", type=click.Path(path_type=Path),
                     metavar="SMALL.onnx",
                     help="compile a cascade: SMALL.onnx answers on the device and MODEL, the "
                          "large model, takes the inputs the rule escalates (needs --samples)"),
        click.option("--rule", default=None, metavar="RULE",
                     help="cascade escalation rule: max-softmax (default), margin, entropy, or "
                          "a scorer ONNX file (reads small-model outputs, returns one "
                          "confidence per row)"),
        click.option("--rule-output", default=None, metavar="NAME",
                     help="cascade: the small model's output the rule reads; its top-1 class "
                          "is the answer (default: the first)"),
        click.option("--output-map", "output_map", multiple=True, metavar="LARGE=SMALL",
                     help="cascade: the small model's output SMALL stands for the large "
                          "model's output LARGE (repeatable; default: same names)"),
        click.option("--agreement", type=float, default=None,
                     help="cascade: calibrate for this agreement with the large model "
                          "(default 0.99)"),
        click.option("--escalation-rate", type=float, default=None,
                     help="cascade: calibrate to escalate at most this share of inputs"),
        click.option("--labels", type=click.Path(path_type=Path), metavar="L.npy",
                     help="cascade: one class per sample row, to record accuracies too"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_cascade(cascade: Path | None, rule: str | None, rule_output: str | None,
                  output_map: tuple[str, ...], agreement: float | None,
                  escalation_rate: float | None, labels: Path | None):
    """The :class:`~tandem.compiler.CascadeOptions` the flags ask for (None without
    ``--cascade``), and the input files they name; one-line errors for flags that need
    ``--cascade`` or do not parse."""
    from tandem.compiler._cascade import CascadeOptions
    from tandem.protocol.errors import InvalidArgument

    given = {"--rule": rule, "--rule-output": rule_output, "--output-map": output_map or None,
             "--agreement": agreement, "--escalation-rate": escalation_rate, "--labels": labels}
    if cascade is None:
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            verb = "applies" if len(used) == 1 else "apply"
            raise InvalidArgument(f"{', '.join(used)} only {verb} to a cascade (--cascade "
                                  "SMALL.onnx)")
        return None, []
    mapping: dict[str, str] = {}
    for text in output_map:
        large, sep, small = text.partition("=")
        if not sep or not large.strip() or not small.strip():
            raise InvalidArgument(f"--output-map {text!r}: expected LARGE=SMALL (output names)")
        if large in mapping:
            raise InvalidArgument(f"--output-map names {large!r} twice")
        mapping[large.strip()] = small.strip()
    kind, scorer = _RULES.get((rule or "max-softmax").lower()), None
    if kind is None:
        scorer = Path(rule)  # type: ignore[arg-type]
        if not (scorer.suffix.lower() == ".onnx" or scorer.exists()):
            raise InvalidArgument(f"--rule {rule!r}: not max-softmax, margin, entropy or an "
                                  "ONNX scorer file")
        kind = "scorer"
    options = CascadeOptions(rule=kind, scorer=scorer, output=rule_output,
                             output_map=mapping or None, agreement=agreement,
                             escalation_rate=escalation_rate, labels=labels)
    files = [(cascade, "--cascade"), *([(scorer, "--rule")] if scorer else []),
             *([(labels, "--labels")] if labels else [])]
    return options, files


def cascade_json(manifest: Any) -> dict | None:
    return None if manifest.cascade is None else manifest.cascade.to_dict()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _curve_rows(cal) -> list[list[str]]:
    """About eleven points of the curve (every 10 % of escalation) and the chosen one."""
    picked: dict[int, Any] = {}
    for target in [i / 10 for i in range(11)]:
        best = min(cal.curve, key=lambda p: abs(p.escalation_rate - target))
        picked[id(best)] = best
    chosen = min(cal.curve, key=lambda p: (abs(p.escalation_rate - cal.chosen.escalation_rate),
                                           abs(p.threshold - cal.chosen.threshold)))
    picked[id(chosen)] = chosen
    rows = []
    for p in sorted(picked.values(), key=lambda p: p.escalation_rate):
        accuracy = [_pct(p.accuracy)] if cal.labelled else []
        rows.append([_pct(p.escalation_rate), f"{p.threshold:.4g}", _pct(p.agreement),
                     *accuracy, "chosen" if p is chosen else ""])
    return rows


def print_cascade(manifest: Any, out=None) -> None:
    """The cascade block of a manifest as lines and a curve table (nothing for another
    bundle)."""
    from tandem.console import Column, print_lines, print_table

    c = manifest.cascade
    if c is None:
        return
    total = manifest.extra.get("total_flops") if isinstance(manifest.extra, dict) else None
    share = (f" ({100 * c.small_flops / total:.1f}% of the large model's)"
             if isinstance(total, (int, float)) and total > 0 else "")
    rule = c.rule
    reads = "probabilities" if rule.probabilities else "logits"
    how = (f"scorer {rule.scorer_part}" if rule.kind == "scorer"
           else f"{rule.kind} of {rule.output!r} ({reads})")
    lines = [f"cascade: small model {c.small_part}, {c.small_flops / 1e9:.3g} GFLOP{share}",
             f"  small digest   {c.small_digest}",
             f"  rule: {how}; escalate when the score is "
             f"{'above' if rule.escalate_above else 'below'} {rule.threshold:.6g}; answer: "
             f"top-1 of {rule.output!r}"]
    renamed = {k: v for k, v in c.output_map.items() if k != v}
    if renamed:
        lines.append("  outputs: " + ", ".join(f"{v} stands for {k}" for k, v in renamed.items()))
    cal = c.calibration
    if cal is not None:
        goal = (f"agreement >= {_pct(cal.target_value)}" if cal.target == "agreement"
                else f"escalation <= {_pct(cal.target_value)}")
        lines.append(f"  calibrated on {cal.samples} sample rows for {goal}: escalates "
                     f"{_pct(cal.chosen.escalation_rate)}, agreement "
                     f"{_pct(cal.chosen.agreement)} (small alone {_pct(cal.small_agreement)})")
        if cal.labelled:
            lines.append(f"  accuracy: small {_pct(cal.small_accuracy)}, large "
                         f"{_pct(cal.large_accuracy)}, cascade {_pct(cal.chosen.accuracy)}")
    print_lines(*lines, out=out)
    if cal is not None and cal.curve:
        print_lines("", out=out)
        accuracy = [Column("accuracy", justify="right", fold=1)] if cal.labelled else []
        print_table([Column("escalated", justify="right"), Column("threshold", justify="right"),
                     Column("agreement", justify="right"), *accuracy, Column("", fold=2)],
                    _curve_rows(cal), title="calibration curve", out=out)
