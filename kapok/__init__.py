"""Kapok: credit scoring and intelligent lending for small lenders."""

import os
import sysconfig
import warnings
from typing import TextIO

# Telemetry off before any of feast / mlflow / bentoml is imported: Kapok runs with no network
# beyond loopback and the configured stores.
for _name, _value in {
    "FEAST_USAGE": "False",
    "BENTOML_DO_NOT_TRACK": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"


def verbose() -> bool:
    """KAPOK_VERBOSE=1 (`kapok --verbose`, inherited by the API's workers): show libraries'
    warnings and logs too."""
    return os.environ.get("KAPOK_VERBOSE", "").lower() in ("1", "true", "yes")


# -- libraries' warnings -------------------------------------------------------------------------
# Users see Kapok's messages, not the deprecation notices libraries raise about each other
# (SQLAlchemy's "noload loader strategy is deprecated" from inside MLflow, pydantic's from inside
# BentoML, Starlette's, ...) nor Feast's notice that on-demand views are "experimental".
# A plain warnings.filterwarnings() is not enough: importing Feast puts
# simplefilter("once", DeprecationWarning) in front of every filter, so the choice is made where
# a warning is shown. Hidden: these categories, raised from a file of an installed library or of
# the standard library. Shown: everything else, in particular any warning raised from Kapok's own
# code (kapok, features, training, serving, review, tests, notebooks, bench).
LIBRARY_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning)
LIBRARY_MESSAGES = ("On demand feature view is an experimental feature",)  # Feast, RuntimeWarning
OWN_PACKAGES = ("kapok", "features", "feature_repo", "training", "serving", "review")

_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_OWN_DIRS = tuple(os.path.join(_ROOT, name) + os.sep for name in OWN_PACKAGES)
_LIBRARY_DIRS = tuple(
    {
        os.path.realpath(sysconfig.get_paths()[key]) + os.sep
        for key in ("purelib", "platlib", "stdlib", "platstdlib")
    }
)


def library_warning(category: type[Warning], message: str, filename: str) -> bool:
    """Whether a warning is one of the libraries' that Kapok hides unless asked to show it."""
    if not (issubclass(category, LIBRARY_CATEGORIES) or message.startswith(LIBRARY_MESSAGES)):
        return False
    path = os.path.realpath(filename)
    if path.startswith(_OWN_DIRS):  # Kapok installed into site-packages is still Kapok
        return False
    return path.startswith(_LIBRARY_DIRS)


_show_warning = warnings.showwarning


def _show_unless_library(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    if not verbose() and library_warning(category, str(message), filename):
        return
    _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = _show_unless_library
