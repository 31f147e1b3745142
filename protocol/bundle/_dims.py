"""Dimension expressions: a frontier tensor's dims as integer functions of the input dims.

The compiler records, for each cut, the shape of every frontier tensor with each dim an ``int``
or an expression over the symbolic dims of the model's inputs (``"height"``,
``"(height - 1)//2 + 1"``, ``"4*batch"``), so a reader can size a frontier for a request of any
size without the model. Grammar (integer arithmetic, Python semantics; whitespace ignored)::

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "//" | "%") unary)*
    unary := "-" unary | atom
    atom  := INT | NAME | "(" expr ")" | ("min" | "max") "(" expr "," expr ")"

``//`` and ``%`` floor as Python's do (so ``-(-a // b)`` is a ceiling). A manifest's text is
untrusted: expressions are parsed by this module's own recursive-descent parser (never
``eval``), limited to :data:`MAX_LENGTH` characters and :data:`MAX_DEPTH` nested levels, and
a division or modulo by zero, a value beyond 2**63 or a negative result is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tandem.protocol.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "DimExpr", "DimExprError"]

MAX_LENGTH = 512
MAX_DEPTH = 32
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*%(),]))")
_FUNCTIONS = ("min", "max")


class DimExprError(InvalidArgument):
    """A dimension expression that does not parse, names an unknown dim, or cannot be
    evaluated (division by zero, negative result)."""


@dataclass(frozen=True)
class DimExpr:
    """A parsed dimension expression; :meth:`evaluate` it with the input dims bound."""

    text: str
    _tree: tuple
    symbols: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> DimExpr:
        if not isinstance(text, str) or not text.strip():
            raise DimExprError("empty dimension expression")
        if len(text) > MAX_LENGTH:
            raise DimExprError(f"dimension expression longer than {MAX_LENGTH} characters")
        parser = _Parser(text)
        tree = parser.expr(0)
        if parser.peek() is not None:
            raise DimExprError(f"{text!r}: unexpected {parser.peek()!r}")
        return cls(text, tree, frozenset(parser.symbols))

    def evaluate(self, dims: Mapping[str, int]) -> int:
        """The value with ``dims`` bound (every symbol must be bound to an int >= 0)."""
        missing = sorted(self.symbols - set(dims))
        if missing:
            raise DimExprError(f"{self.text!r}: no value for {', '.join(missing)}")
        value = _eval(self._tree, dims, self.text)
        if value < 0:
            raise DimExprError(f"{self.text!r} is negative ({value}) at {dict(dims)}")
        return value


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None:
                raise DimExprError(f"{text!r}: unexpected character at {pos}")
            number, name, op = m.groups()
            self.tokens.append(("int", number) if number else ("name", name) if name
                               else ("op", op))
            pos = m.end()
        self.i = 0
        self.symbols: set[str] = set()

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise DimExprError(f"{self.text!r}: ends too early")
        token = self.tokens[self.i]
        if expected is not None and token != ("op", expected):
            raise DimExprError(f"{self.text!r}: expected {expected!r}, got {token[1]!r}")
        self.i += 1
        return token

    def expr(self, depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise DimExprError(f"{self.text!r}: nested deeper than {MAX_DEPTH} levels")
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            node = (op, node, self.term(depth))
        return node

    def term(self, depth: int) -> tuple:
        node = self.unary(depth)
        while self.peek() in ("*", "//", "%"):
            op = self.take()[1]
            node = (op, node, self.unary(depth))
        return node

    def unary(self, depth: int) -> tuple:
        if self.peek() == "-":
            self.take()
            if depth > MAX_DEPTH:
                raise DimExprError(f"{self.text!r}: nested deeper than {MAX_DEPTH} levels")
            return ("neg", self.unary(depth + 1))
        return self.atom(depth)

    def atom(self, depth: int) -> tuple:
        kind, value = self.take()
        if kind == "int":
            return ("int", int(value))
        if kind == "name":
            if value in _FUNCTIONS and self.peek() == "(":
                self.take("(")
                a = self.expr(depth + 1)
                self.take(",")
                b = self.expr(depth + 1)
                self.take(")")
                return (value, a, b)
            self.symbols.add(value)
            return ("sym", value)
        if value == "(":
            node = self.expr(depth + 1)
            self.take(")")
            return node
        raise DimExprError(f"{self.text!r}: unexpected {value!r}")


def _eval(node: tuple, dims: Mapping[str, int], text: str) -> int:
    op = node[0]
    if op == "int":
        return node[1]
    if op == "sym":
        value = dims[node[1]]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DimExprError(f"{node[1]} must be an int >= 0, got {value!r}")
        return value
    if op == "neg":
        return -_eval(node[1], dims, text)
    a = _eval(node[1], dims, text)
    b = _eval(node[2], dims, text)
    if op in ("//", "%") and b == 0:
        raise DimExprError(f"{text!r}: division by zero at {dict(dims)}")
    value = _OPS[op](a, b)
    if abs(value) > _LIMIT:
        raise DimExprError(f"{text!r}: value beyond 2**63 at {dict(dims)}")
    return value


_LIMIT = 2**63
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
    "min": min,
    "max": max,
}
