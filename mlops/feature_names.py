"""How a dataset's column names become the input names of its ONNX model.

Columns of real tables are named anything: ``mean radius``, ``od280/od315``, ``température``,
``2nd_reading``. ONNX requires graph names to be C identifiers, and converters rename
inputs their own way, so the platform maps each feature column to an ONNX input name with
one rule, defined here and nowhere else:

- ASCII letters, digits and ``_`` are kept;
- accented letters lose their accents (``é`` -> ``e``, through Unicode NFKD);
- spaces and ASCII punctuation become ``_``;
- any other character becomes ``u`` and its code point in hex (``温`` -> ``u6e29``);
- a name that is empty or starts with a digit gets a leading ``_``.

A name that already is an identifier of this kind maps to itself, so models exported
before the rule existed keep working. Only the ONNX graph sees the mapped names: training
data, scoring inputs, online requests, Open Inference Protocol metadata and the prediction
log all use the dataset's own column names, and ``OnnxScorer`` translates when it builds
the model's feeds. Two columns whose names map to the same input name are refused when the
dataset is declared.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

_KEPT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def onnx_input_name(column: str) -> str:
    """The ONNX input name of a feature column (a C identifier; identity for identifiers)."""
    out: list[str] = []
    for ch in unicodedata.normalize("NFKD", column):
        if ch in _KEPT:
            out.append(ch)
        elif unicodedata.combining(ch):
            continue
        elif ch.isascii() or ch.isspace():
            out.append("_")
        else:
            out.append(f"u{ord(ch):04x}")
    name = "".join(out)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def onnx_input_names(columns: Iterable[str]) -> dict[str, str]:
    """Each column's ONNX input name, in column order.

    Raises ``ValueError`` naming the columns when two of them map to the same input name.
    """
    mapping: dict[str, str] = {}
    taken: dict[str, str] = {}
    for column in columns:
        name = onnx_input_name(column)
        if name in taken and taken[name] != column:
            raise ValueError(
                f"columns {taken[name]!r} and {column!r} both become ONNX input {name!r}; rename one of them"
            )
        taken[name] = column
        mapping[column] = name
    return mapping
