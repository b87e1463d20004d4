"""Edge budgets: strict, frozen configuration with errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlops.edge.budget import EdgeBudget, QuantizeSpec, load_budget, runtime_tuple
from mlops.errors import ConfigError

EDGE_CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "edge").glob("*.yaml"))


@pytest.mark.parametrize("path", EDGE_CONFIGS, ids=[p.name for p in EDGE_CONFIGS])
def test_every_shipped_budget_loads(path: Path) -> None:
    """Every budget in configs/edge/ is valid, and every variant's source is an earlier variant."""
    budget = load_budget(path)
    assert isinstance(budget, EdgeBudget)
    names = [v.name for v in budget.variants]
    for v in budget.variants:
        source = getattr(v, "source", None)
        assert source is None or names.index(source) < names.index(v.name)


def test_pos_terminal_budget_is_the_embedded_default() -> None:
    """configs/edge/pos-terminal.yaml spells out exactly what `mlops edge export` uses without --budget."""
    assert load_budget(Path("configs/edge/pos-terminal.yaml").resolve()) == EdgeBudget()
    assert load_budget(None) == EdgeBudget()


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    """A typo inside a variant fails with the file and the dotted field path."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "variants:\n  - {kind: baseline, name: float}\n  - {kind: quantize, name: q, source: float, mod: dynamic}\n"
    )
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: variants\.1\.quantize\.mod: Extra inputs are not permitted"
    ):
        load_budget(bad)


def test_wrong_type_is_rejected_not_coerced(tmp_path: Path) -> None:
    """A quoted number where a number belongs is an error, not silently converted."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_size_bytes: '16384'\n")
    with pytest.raises(ConfigError, match=r"limits\.max_size_bytes"):
        load_budget(bad)


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        (
            "[{kind: baseline, name: float}, {kind: quantize, name: q, source: nope}]",
            "source 'nope' is not an earlier variant",
        ),
        (
            "[{kind: baseline, name: float}, {kind: baseline, name: float}]",
            "variant name 'float' is used twice",
        ),
        ("[{kind: distill, name: s}]", "need a 'baseline'"),
        (
            "[{kind: baseline, name: f}, {kind: quantize, name: q, source: f, mode: static}]",
            "needs a calibration method",
        ),
        (
            "[{kind: baseline, name: f}, {kind: quantize, name: q, source: f, calibration: minmax}]",
            "remove 'calibration'",
        ),
    ],
)
def test_inconsistent_variant_lists_are_rejected(tmp_path: Path, variants: str, message: str) -> None:
    """Sources must exist earlier, names are unique, a baseline exists, calibration matches the mode."""
    bad = tmp_path / "budget.yaml"
    bad.write_text(f"variants: {variants}\n")
    with pytest.raises(ConfigError, match=message):
        load_budget(bad)


def test_budget_models_are_frozen() -> None:
    """A loaded budget cannot be changed in place."""
    spec = QuantizeSpec(name="q", source="float")
    with pytest.raises(ValueError, match="frozen"):
        spec.per_channel = True  # type: ignore[misc]


def test_missing_budget_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_budget(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.20.0", (1, 20, 0)),
        ("1.32.0+cpu", (1, 32, 0)),
        ("1.21.0rc1", (1, 21, 0)),
        ("2", (2,)),
        ("1.x", (1,)),
    ],
)
def test_runtime_versions_compare_numerically(text: str, expected: tuple[int, ...]) -> None:
    """Runtime versions compare as numbers (1.9 < 1.20), ignoring local and pre-release suffixes."""
    assert runtime_tuple(text) == expected
    assert runtime_tuple("1.9.0") < runtime_tuple("1.20.0")
