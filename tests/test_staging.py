"""All-or-nothing folder outputs (kapok/staging.py): a `kapok data generate` or `kapok features
build` that fails part-way, or a process killed in the middle of the swap, leaves the previous
output in place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kapok import staging


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _output(folder: Path, text: str) -> None:
    (folder / "table").mkdir(parents=True)
    (folder / "table" / "part-0000.parquet").write_text(text)
    (folder / "_manifest.json").write_text(text)


def _content(folder: Path) -> str:
    return (folder / "table" / "part-0000.parquet").read_text()


class Killed(BaseException):
    """The process dies here (SIGKILL, power cut): nothing after this line runs."""


def test_a_build_that_fails_part_way_leaves_the_previous_feature_tables(tmp_path):
    from features.build import build
    from kapok.bigdata.generate import generate
    from kapok.bigdata.simulate import SimulationConfig

    raw, features = tmp_path / "raw", tmp_path / "features"
    generate(SimulationConfig(enterprises=300, months=24, seed=3), raw)
    build(raw, features)
    before = _digest(features)
    assert len(before) > 8  # a table per family and the manifest

    written: list[str] = []

    def disk_full_at_the_fourth_table(family: str) -> None:
        written.append(family)
        if len(written) == 4:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build(raw, features, progress=disk_full_at_the_fourth_table)
    assert len(written) == 4  # three tables were already written when it failed
    assert _digest(features) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features", "raw"]


def test_a_crash_between_the_two_renames_is_undone_on_the_next_run(tmp_path, monkeypatch):
    """Where the file system has no atomic exchange the swap is two renames; a process killed
    between them leaves the old folder as out.old and no `out`: the next run puts it back."""
    out = tmp_path / "raw"
    _output(out, "previous")
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    rename, calls = os.rename, []

    def killed_at_the_second_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise Killed
        rename(src, dst)

    monkeypatch.setattr(staging.os, "rename", killed_at_the_second_rename)
    with pytest.raises(Killed), staging.staged_folder(out) as new:
        _output(new, "new")
    monkeypatch.setattr(staging.os, "rename", rename)
    assert calls == [("raw", "raw.old"), ("raw.partial", "raw")]
    assert not out.exists() and _content(tmp_path / "raw.old") == "previous"

    # the next run fails part-way too: the previous output is back, nothing else is left
    with pytest.raises(RuntimeError), staging.staged_folder(out) as new:
        _output(new, "half")
        raise RuntimeError("disk full")
    assert _content(out) == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]

    # and a run that completes replaces it, still with two renames
    with staging.staged_folder(out) as new:
        _output(new, "new")
    assert _content(out) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def _has_exchange(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return staging._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def test_on_linux_the_swap_is_one_atomic_exchange(tmp_path, monkeypatch):
    """No moment without the output: no rename of the existing folder, one exchange; killed
    while the old copy is deleted, the new output is in place and the next run cleans up."""
    if not _has_exchange(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename path is tested above")
    out = tmp_path / "features"
    _output(out, "previous")

    def no_rename(src, dst):
        raise AssertionError(f"renamed {src} -> {dst}: a moment without {out.name}")

    monkeypatch.setattr(staging.os, "rename", no_rename)
    remove = staging._remove

    def killed_deleting_the_old_copy(path: Path) -> None:
        if (path / "_manifest.json").exists() and (path / "_manifest.json").read_text() == (
            "previous"
        ):
            raise Killed
        remove(path)

    monkeypatch.setattr(staging, "_remove", killed_deleting_the_old_copy)
    with pytest.raises(Killed), staging.staged_folder(out) as new:
        _output(new, "new")
    assert _content(out) == "new"
    monkeypatch.setattr(staging, "_remove", remove)
    with staging.staged_folder(out) as new:
        _output(new, "newer")
    assert _content(out) == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"]


def test_a_linked_output_is_replaced_and_its_target_kept(tmp_path):
    """KAPOK_HOME/data/raw may be a symbolic link to shared tables: a new run replaces the
    link with its own folder and never deletes what the link pointed to."""
    shared = tmp_path / "shared"
    _output(shared, "shared")
    out = tmp_path / "home" / "raw"
    out.parent.mkdir()
    out.symlink_to(shared)
    with staging.staged_folder(out) as new:
        _output(new, "own")
    assert not out.is_symlink() and _content(out) == "own"
    assert _content(shared) == "shared"
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw"]
