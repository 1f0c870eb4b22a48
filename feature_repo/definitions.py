"""Kapok's Feast feature repository for the `feast` CLI (`cd $KAPOK_HOME/feature_repo`).

The definitions are generated from the feature schema (features/schema.py) by
features/feast_defs.py; `kapok features apply` registers the same objects and renders
feature_store.yaml next to this file from KAPOK_HOME and KAPOK_ONLINE_STORE.
"""

import kapok  # noqa: F401  (telemetry off)
from features.feast_defs import definitions
from kapok.settings import paths

# Feast's CLI collects Feast objects from module globals.
globals().update({obj.name: obj for obj in definitions(paths().features)})
