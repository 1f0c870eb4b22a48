"""Features: the schema, polars point-in-time pipelines, Feast definitions, dataset specs."""
