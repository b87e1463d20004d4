"""MLflow model registry adapter: versions, aliases with compare-and-set, audit history."""
