"""Types of the deployments' parameters, as the Prefect UI's run form renders them.

A ``Literal`` becomes a drop-down. Each parameter below offers the platform's own choices
(its registry aliases, the shipped rollout plans and device budgets) and, as a second
option of the form, any other value typed in: a custom alias, a version number, a plan
file of the team's own. The flows accept both; the CLI passes plain strings.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from mlops.registry_model import ModelAlias

ShippedPlan = Literal[
    "configs/rollout/demo.yaml",
    "configs/rollout/demo-live.yaml",
    "configs/rollout/production.yaml",
    "configs/rollout/bandit.yaml",
]
ShippedBudget = Literal["configs/edge/pos-terminal.yaml", "configs/edge/mobile-app.yaml"]

SHIPPED_PLANS: tuple[str, ...] = get_args(ShippedPlan)
SHIPPED_BUDGETS: tuple[str, ...] = get_args(ShippedBudget)

_PlatformAlias = Annotated[ModelAlias, Field(title="platform alias")]
AliasParam = _PlatformAlias | Annotated[str, Field(title="another alias")]
CandidateParam = _PlatformAlias | Annotated[str, Field(title="another alias or a version")]
PlanParam = Annotated[ShippedPlan, Field(title="shipped plan")] | Annotated[str, Field(title="plan file")]
BudgetParam = (
    Annotated[ShippedBudget, Field(title="shipped budget")] | Annotated[str, Field(title="budget file")]
)
