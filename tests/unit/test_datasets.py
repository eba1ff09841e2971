"""The plain dataset format: Beauty conversion, the reader, and its error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onerec_prod.datasets import (
    INTERACTIONS_FILE,
    ITEMS_FILE,
    DatasetError,
    Item,
    convert_beauty,
    load_dataset,
    resolve_dataset,
    write_dataset,
)


@pytest.fixture(scope="module")
def converted(beauty_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("beauty") / "plain"
    convert_beauty(beauty_dir, out)
    return out


def test_convert_beauty_keeps_every_interaction_with_real_ids(converted, beauty_dir):
    ds = load_dataset(converted)
    assert (len(ds.interactions), len(ds.items)) == (198_502, 12_101)
    assert len({i.user_id for i in ds.interactions}) == 22_363
    first = ds.interactions[0]
    # P5 user 1 = reviewer A1YJEY40YUW4SE, P5 item 1 = ASIN B004756YJA, reviewed 2011-10-18
    assert (first.user_id, first.item_id, first.ts, first.position) == (
        "A1YJEY40YUW4SE", "B004756YJA", 1318896000, 0)
    assert ds.timed and first.event_type == "review"
    assert ds.items["B004756YJA"].title.startswith("OPI Nail Lacquer, Simmer and Shimmer")
    # the P5 sequence of user 1 is kept in order (line 1 of sequential_data.txt: "1 1 2 3 4 5")
    maps = json.loads((beauty_dir / "p5" / "datamaps.json").read_text())
    want = [maps["id2item"][str(k)] for k in (1, 2, 3, 4, 5)]
    assert [i.item_id for i in ds.interactions[:5]] == want


def test_resolve_dataset_converts_beauty_once(beauty_dir, tmp_path):
    out = resolve_dataset(beauty_dir, tmp_path)
    assert out == tmp_path / "datasets" / "beauty"
    mtime = (out / INTERACTIONS_FILE).stat().st_mtime_ns
    assert resolve_dataset(beauty_dir, tmp_path) == out
    assert (out / INTERACTIONS_FILE).stat().st_mtime_ns == mtime  # cached, not reconverted
    assert resolve_dataset(out, tmp_path) == out  # a plain-format dir is used as is


def _write(tmp_path: Path, interactions: str, items: list[dict] | str | None = None) -> Path:
    if items is None:
        items = [{"item_id": "i1", "title": "One", "categories": "A > B"},
                 {"item_id": "i2", "title": "Two", "categories": None, "description": "d"}]
    text = items if isinstance(items, str) else "".join(json.dumps(i) + "\n" for i in items)
    (tmp_path / ITEMS_FILE).write_text(text)
    (tmp_path / INTERACTIONS_FILE).write_text(interactions)
    return tmp_path


def test_any_dataset_in_the_format_loads(tmp_path):
    d = _write(tmp_path, "user_id\titem_id\tts\nu1\ti1\t100\nu2\ti2\t50\nu1\ti2\t100\n")
    ds = load_dataset(d)
    assert [(i.user_id, i.item_id, i.ts, i.position, i.line_no) for i in ds.interactions] == [
        ("u1", "i1", 100, 0, 2), ("u2", "i2", 50, 0, 3), ("u1", "i2", 100, 1, 4)]
    assert ds.items["i2"] == Item("i2", "Two", None, "d")
    untimed = load_dataset(_write(tmp_path, "user_id\titem_id\tts\nu1\ti1\t\nu1\ti2\t\n"))
    assert not untimed.timed and [i.ts for i in untimed.interactions] == [None, None]


def test_write_then_load_round_trip(tmp_path):
    rows = [("u1", "i1", 5, "click"), ("u1", "i1", 6, None)]
    write_dataset(tmp_path, rows, [Item("i1", "One", "A")])
    ds = load_dataset(tmp_path)
    assert [(i.user_id, i.item_id, i.ts, i.event_type) for i in ds.interactions] == [
        ("u1", "i1", 5, "click"), ("u1", "i1", 6, None)]


@pytest.mark.parametrize(
    ("interactions", "items", "needle"),
    [
        # header without the ts column
        ("user_id\titem_id\nu1\ti1\n", None, "interactions.tsv:1: header"),
        # wrong number of columns on line 3
        ("user_id\titem_id\tts\nu1\ti1\t1\nu1\ti1\n", None, "interactions.tsv:3: expected 3"),
        # ts is not an integer
        ("user_id\titem_id\tts\nu1\ti1\tyesterday\n", None, "interactions.tsv:2: column 'ts'"),
        # negative ts
        ("user_id\titem_id\tts\nu1\ti1\t-4\n", None, "interactions.tsv:2: column 'ts': negative"),
        # item not in items.jsonl
        ("user_id\titem_id\tts\nu1\tzz\t1\n", None, "interactions.tsv:2: column 'item_id': 'zz'"),
        # empty user
        ("user_id\titem_id\tts\n\ti1\t1\n", None, "interactions.tsv:2: column 'user_id' is empty"),
        # some rows timed, some not
        ("user_id\titem_id\tts\nu1\ti1\t1\nu2\ti1\t\n", None, "interactions.tsv:3: column 'ts': empty"),
        # a user's rows go back in time
        ("user_id\titem_id\tts\nu1\ti1\t9\nu1\ti2\t3\n", None, "interactions.tsv:3: column 'ts': 3 is earlier"),
        # items: bad JSON on line 2
        ("user_id\titem_id\tts\n", '{"item_id": "i1", "title": "x"}\n{"item_id": \n', "items.jsonl:2: not valid JSON"),
        # items: title missing
        ("user_id\titem_id\tts\n", [{"item_id": "i1"}], "items.jsonl:1: column 'title' is missing"),
        # items: title not a string
        ("user_id\titem_id\tts\n", [{"item_id": "i1", "title": 3}], "items.jsonl:1: column 'title' must be"),
        # items: duplicate id
        ("user_id\titem_id\tts\n", [{"item_id": "i1", "title": "a"}, {"item_id": "i1", "title": "b"}],
         "items.jsonl:2: column 'item_id': duplicate"),
    ],
)
def test_bad_input_names_file_line_and_column(tmp_path, interactions, items, needle):
    d = _write(tmp_path, interactions, items)
    with pytest.raises(DatasetError) as err:
        load_dataset(d)
    assert needle in str(err.value)


def test_missing_file_and_raw_beauty_hint(tmp_path, beauty_dir):
    with pytest.raises(DatasetError, match="interactions.tsv: missing"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="convert-dataset"):
        load_dataset(beauty_dir)


def test_convert_dataset_cli(tmp_path, beauty_dir, capsys):
    from onerec_prod.cli import main

    (tmp_path / "sample").mkdir()
    sample = _write(tmp_path / "sample", "user_id\titem_id\tts\nu1\ti1\t1\n")
    assert main(["--config", "configs/test.yaml", "--set", f"paths.var_root={tmp_path}",
                 "convert-dataset", "--check", str(sample)]) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 1
