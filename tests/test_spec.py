"""Dataset specs: the two shipped public data sets load, and bad specs fail with a named field."""

from __future__ import annotations

import logging
from io import StringIO
from pathlib import Path

import polars as pl
import pytest

from features.spec import ROW_ID, SpecError, load_dataset, load_spec

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


# --- shipped specs ------------------------------------------------------------------------------


def test_german_credit_loads() -> None:
    spec = load_spec(DATASETS / "german_credit.toml")
    assert spec.name == "german_credit"
    assert spec.path == (DATASETS / "german_credit.csv").resolve()
    assert spec.path.is_absolute()
    assert spec.id_column is None
    assert spec.timestamp_column is None
    assert spec.label_column == "creditability"
    assert spec.bad_value == "bad"
    assert spec.segments == ("purpose", "personal_status_and_sex")
    assert len(spec.features) == 20

    directions = {f.name: f.direction for f in spec.features}
    assert directions["duration_in_month"] == 1
    assert directions["credit_amount"] == 1
    assert directions["age_in_years"] == -1
    assert directions["job"] == 0
    for f in spec.features:
        assert not (f.categorical and f.direction != 0)

    df = load_dataset(spec)
    assert df.height == 1000
    assert df["label"].sum() == 300
    assert df["label"].dtype == pl.Int8
    assert set(df["label"].unique()) == {0, 1}
    assert df[ROW_ID].to_list() == list(range(1000))
    assert df.columns[0] == ROW_ID
    assert df.columns[-1] == "label"
    assert "creditability" not in df.columns
    for name in spec.categorical_features:
        assert df.schema[name] == pl.String, name
    assert spec.categorical_features  # string columns are declared categorical
    assert df.schema["duration_in_month"].is_numeric()


def test_belanche_loads() -> None:
    spec = load_spec(DATASETS / "credit_scoring_belanche.toml")
    assert spec.label_column == "Status"
    assert spec.segments == ("Home", "Job")
    directions = {f.name: f.direction for f in spec.features}
    assert directions == {
        "Seniority": -1,
        "Home": 0,
        "Time": 0,
        "Age": 0,
        "Marital": 0,
        "Records": 0,
        "Job": 0,
        "Expenses": 0,
        "Income": -1,
        "Assets": -1,
        "Debt": 1,
        "Amount": 1,
        "Price": 0,
    }
    assert set(spec.categorical_features) == {"Home", "Marital", "Records", "Job"}

    raw = pl.read_parquet(DATASETS / "credit_scoring_belanche.parquet")
    assert raw.height == 4454
    labelled = raw.filter(pl.col("Status").is_not_null())
    expected_bad = labelled.filter(pl.col("Status") == "bad").height

    df = load_dataset(spec)
    assert df.height == labelled.height
    assert df["label"].sum() == expected_bad
    assert set(df["label"].unique()) == {0, 1}
    for name in ("Home", "Marital", "Records", "Job"):
        assert df.schema[name] == pl.String
    assert df[ROW_ID].n_unique() == df.height


# --- hand-written specs in tmp_path ---------------------------------------------------------------

DATA_CSV = """\
cust,applied_at,amount,purpose,outcome
a,2024-01-05,1000,car,good
b,2024-02-10,2500,tv,bad
c,2024-03-15,400,car,good
d,2024-04-20,,tv,
"""

GOOD_SPEC = """\
name = "tiny"
path = "tiny.csv"
id = "cust"
timestamp = "applied_at"
segments = ["purpose"]

[label]
column = "outcome"
bad = "bad"

[features.amount]
direction = 1

[features.purpose]
categorical = true
"""


def write_spec(tmp_path: Path, text: str, name: str = "tiny.toml") -> Path:
    (tmp_path / "tiny.csv").write_text(DATA_CSV)
    spec_path = tmp_path / name
    spec_path.write_text(text)
    return spec_path


def test_tiny_spec_with_id_timestamp_and_null_label(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = load_spec(write_spec(tmp_path, GOOD_SPEC))
    assert spec.path == (tmp_path / "tiny.csv").resolve()
    with caplog.at_level(logging.WARNING, logger="features.spec"):
        df = load_dataset(spec)
    assert "dropped 1 of 4 rows with a null label" in caplog.text
    assert df.columns == ["cust", "applied_at", "amount", "purpose", "label"]
    assert df["cust"].to_list() == ["a", "b", "c"]
    assert df.schema["applied_at"] == pl.Datetime("us")
    assert df["label"].to_list() == [0, 1, 0]


def expect_error(tmp_path: Path, text: str, *fragments: str) -> None:
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_dataset(load_spec(path))
    message = str(info.value)
    assert message.startswith("tiny.toml: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_direction(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace("direction = 1", "direction = 2")
    expect_error(tmp_path, text, "features.amount.direction must be -1, 0 or 1, got 2")


def test_categorical_with_direction(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace("categorical = true", "categorical = true\ndirection = -1")
    expect_error(tmp_path, text, "features.purpose.direction must be 0 for a categorical")


def test_label_column_missing_from_data(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('column = "outcome"', 'column = "default_flag"')
    expect_error(tmp_path, text, "'default_flag' (label.column)", "available columns: cust,")


def test_data_file_missing(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('path = "tiny.csv"', 'path = "nowhere.csv"')
    expect_error(tmp_path, text, "path 'nowhere.csv' does not exist")


def test_unsupported_extension(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('path = "tiny.csv"', 'path = "tiny.xlsx"')
    expect_error(tmp_path, text, "path 'tiny.xlsx' has unsupported extension '.xlsx'")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    expect_error(tmp_path, 'lable = "oops"\n' + GOOD_SPEC, "unknown top-level key(s): lable")


def test_toml_syntax_error(tmp_path: Path) -> None:
    expect_error(tmp_path, GOOD_SPEC + "[features.broken\n", "invalid TOML")


def test_bad_value_absent_from_data(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('bad = "bad"', 'bad = "defaulted"')
    expect_error(tmp_path, text, "label.bad value 'defaulted' does not occur in column 'outcome'")


def test_missing_required_key(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('column = "outcome"\n', "")
    expect_error(tmp_path, text, "missing required key label.column")


def test_empty_features(tmp_path: Path) -> None:
    head = GOOD_SPEC.split("[features.amount]")[0]
    expect_error(tmp_path, head + "[features]\n", "features must declare at least one feature")


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('segments = ["purpose"]', 'segments = "purpose"')
    expect_error(tmp_path, text, "segments must be a list of column names")


def test_bad_value_type_mismatch(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('bad = "bad"', "bad = 1")
    expect_error(tmp_path, text, "label.bad is int 1 but label column 'outcome' has dtype String")


def test_unparseable_timestamp(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('timestamp = "applied_at"', 'timestamp = "purpose"').replace(
        'segments = ["purpose"]\n', ""
    )
    text = text.replace("[features.purpose]\ncategorical = true\n", "")
    expect_error(tmp_path, text, "timestamp column 'purpose' cannot be parsed as a datetime")


def test_string_feature_not_marked_categorical(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace("categorical = true", "")
    expect_error(tmp_path, text, "features.purpose: column has dtype String")


def test_duplicate_id(tmp_path: Path) -> None:
    text = GOOD_SPEC.replace('id = "cust"', 'id = "purpose"')
    text = text.replace("[features.purpose]\ncategorical = true\n", "")
    expect_error(tmp_path, text, "id column 'purpose' must be unique")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (  # unknown keys
            "direction = 1",
            "direction = 1\nmonotone = true\nbins = 5",
            "unknown key(s) in features.amount: monotone, bins "
            "(allowed: categorical, description, direction)",
        ),
        ("direction = 1", "direction = 5", "features.amount.direction must be -1, 0 or 1, got 5"),
        (
            "direction = 1",
            "direction = true",
            "features.amount.direction must be -1, 0 or 1, got True",
        ),
        (  # wrong types
            "categorical = true",
            'categorical = "yes"',
            "features.purpose.categorical must be true or false, got 'yes'",
        ),
        ('id = "cust"', "id = 7", "id must be a string, got 7"),
        ('bad = "bad"', "bad = [1]", "label.bad must be a string, number or boolean, got [1]"),
        ('bad = "bad"\n', "", "missing required key label.bad"),
    ],
)
def test_error_is_one_line_naming_the_file_and_the_field(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    """The whole message: the spec file, the field's path, what is wrong; no pydantic wording."""
    assert GOOD_SPEC.count(old) == 1, old
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path, GOOD_SPEC.replace(old, new)))
    assert str(info.value) == f"tiny.toml: {message}"


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^absent\.toml: spec file not found"):
        load_spec(tmp_path / "absent.toml")


# --- features = "*": every column but a listed few ------------------------------------------------

WIDE_CSV = """\
ref,applied_at,amount,purpose,tenure,is_owner,note,opened_on,outcome
a,2024-01-05,1000,car,3,true,x,2020-01-01,good
b,2024-02-10,2500,tv,1,false,y,2021-05-01,bad
c,2024-03-15,400,car,7,true,z,2019-03-01,good
"""

STAR_HEAD = """\
name = "wide"
path = "wide.csv"
id = "ref"
timestamp = "applied_at"
segments = ["purpose"]
"""

LABEL_TABLE = '[label]\ncolumn = "outcome"\nbad = "bad"\n'


def load_wide(tmp_path: Path, text: str) -> tuple[str, ...]:
    (tmp_path / "wide.csv").write_text(WIDE_CSV)
    (tmp_path / "wide.toml").write_text(text)
    spec = load_spec(tmp_path / "wide.toml")
    assert load_dataset(spec).columns[-1] == "label"
    return spec.feature_names


def test_every_column_but_the_excluded(tmp_path: Path) -> None:
    text = STAR_HEAD + 'features = "*"\nexclude = ["note", "opened_on"]\n' + LABEL_TABLE
    (tmp_path / "wide.csv").write_text(WIDE_CSV)
    (tmp_path / "wide.toml").write_text(text)
    spec = load_spec(tmp_path / "wide.toml")
    # the file's order; not the id, timestamp or label; the segment is a feature too
    assert spec.feature_names == ("amount", "purpose", "tenure", "is_owner")
    assert spec.categorical_features == ("purpose",)  # text columns are categorical
    assert {f.direction for f in spec.features} == {0}  # undeclared: no monotone constraint
    assert spec.every_column and spec.excluded == ("note", "opened_on")
    frame = load_dataset(spec)
    assert frame.columns == ["ref", "applied_at", *spec.feature_names, "label"]
    assert frame["label"].to_list() == [0, 1, 0]


def test_feature_tables_annotate_and_override_the_star(tmp_path: Path) -> None:
    text = (
        STAR_HEAD
        + 'exclude = ["note", "opened_on", "is_owner"]\n'
        + LABEL_TABLE
        + '[features."*"]\n'
        + '[features.amount]\ndirection = 1\ndescription = "requested amount"\n'
        + "[features.tenure]\ncategorical = true\n"  # a numeric code read as a category
    )
    (tmp_path / "wide.csv").write_text(WIDE_CSV)
    (tmp_path / "wide.toml").write_text(text)
    spec = load_spec(tmp_path / "wide.toml")
    assert spec.feature_names == ("amount", "purpose", "tenure")
    by_name = {f.name: f for f in spec.features}
    assert (by_name["amount"].direction, by_name["amount"].description) == (1, "requested amount")
    assert by_name["tenure"].categorical and by_name["purpose"].categorical
    assert load_dataset(spec).schema["tenure"] == pl.String


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            STAR_HEAD + 'features = "*"\nexclude = ["notes", "opened_on"]\n' + LABEL_TABLE,
            "missing from wide.csv: 'notes' (exclude)",
        ),
        (
            STAR_HEAD + 'exclude = ["note"]\n' + LABEL_TABLE + "[features.amount]\n",
            'exclude is only used with features = "*"',
        ),
        (
            STAR_HEAD + 'features = "*"\n' + LABEL_TABLE + "[features.amount]\ndirection = 1\n",
            'write [features."*"] instead of features = "*"',  # TOML cannot hold both
        ),
        (
            STAR_HEAD
            + 'exclude = ["note", "opened_on"]\n'
            + LABEL_TABLE
            + '[features."*"]\n[features.purpose]\ndirection = 1\n',
            "features.purpose.direction must be 0 for a categorical feature",
        ),
        (STAR_HEAD + 'features = "all"\n' + LABEL_TABLE, 'features must be "*" (every column)'),
    ],
)
def test_every_column_spec_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_wide(tmp_path, text)
    assert str(info.value).startswith("wide.toml: "), info.value
    assert message in str(info.value), info.value


def test_every_column_refuses_a_date_column(tmp_path: Path) -> None:
    """A Parquet date column (not the timestamp) cannot be a feature: the spec must exclude it.
    (In a CSV, dates read as text, i.e. categorical; `kapok data check-spec` warns about them.)"""
    pl.read_csv(StringIO(WIDE_CSV), try_parse_dates=True).write_parquet(tmp_path / "wide.parquet")
    text = STAR_HEAD.replace("wide.csv", "wide.parquet") + 'features = "*"\n' + LABEL_TABLE
    (tmp_path / "wide.toml").write_text(text)
    with pytest.raises(SpecError, match=r"cannot be features: opened_on \(Date\); add them to"):
        load_spec(tmp_path / "wide.toml")
    (tmp_path / "wide.toml").write_text(text.replace('"*"\n', '"*"\nexclude = ["opened_on"]\n'))
    assert "opened_on" not in load_spec(tmp_path / "wide.toml").feature_names
