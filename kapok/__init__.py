"""Kapok: credit scoring and intelligent lending for small lenders."""

import os

# Telemetry off before any of feast / mlflow / bentoml is imported: Kapok runs with no network
# beyond loopback and the configured stores.
for _name, _value in {
    "FEAST_USAGE": "False",
    "BENTOML_DO_NOT_TRACK": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
