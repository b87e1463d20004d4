"""Tasks that read and validate datasets."""

from __future__ import annotations

import pandas as pd
from prefect import task

from adapters import datasets, validation
from mlops.settings import DatasetSchema


@task(name="load-dataset", retries=2, retry_delay_seconds=[1, 5])
def load_dataset(path: str, schema: DatasetSchema | None = None) -> pd.DataFrame:
    """The whole dataset at ``path`` (a CSV typed by ``schema``'s declared columns)."""
    return datasets.read_frame(path, schema)


@task(name="validate-dataset")
def validate_dataset(
    frame: pd.DataFrame, schema: DatasetSchema, require_label: bool, source: str
) -> validation.ValidationSummary:
    """Great Expectations suite of the schema; raises ``ValidationFailed`` listing each failure."""
    return validation.validate_or_raise(frame, schema, require_label=require_label, source=source)
