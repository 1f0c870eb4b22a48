"""Feature engineering: the feature schema, polars point-in-time pipelines, Feast definitions, dataset specs."""
