"""Pure logic of the platform.

Nothing in this package imports prefect, mlflow, bentoml, duckdb or dask: it holds the
settings models, dataset schema and fingerprints, promotion gates, statistics and the
other deterministic decisions the flows and adapters are built around.
"""
