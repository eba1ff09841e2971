"""The synthetic landing days of the scale bench: seeded, Zipf-shaped, and every bad line is one
the ingest rules quarantine with the reason it was made for."""

from __future__ import annotations

import json
from collections import Counter

from jobs.ingest_events import reference_ingest
from onerec_prod import synth


def _lines(raw, dt):
    out = []
    for f in sorted((raw / "events" / f"dt={dt}").glob("*.jsonl")):
        out += [(f"events/dt={dt}/{f.name}", no, ln) for no, ln in enumerate(f.read_text().splitlines(), 1)]
    return out


def test_synthetic_day_is_seeded_and_its_bad_lines_are_quarantined_as_made(tmp_path):
    dt = "2014-03-02"
    m = synth.write_day(tmp_path / "a", dt, 20_000, n_items=5_000, seed=3, bad_share=0.02, files=3)
    again = synth.write_day(tmp_path / "b", dt, 20_000, n_items=5_000, seed=3, bad_share=0.02, files=3)
    files = sorted((tmp_path / "a" / "events" / f"dt={dt}").glob("*.jsonl"))
    assert len(files) == 3 and m == {**again, "bytes": m["bytes"]}
    assert [f.read_bytes() for f in files] == [
        f.read_bytes() for f in sorted((tmp_path / "b" / "events" / f"dt={dt}").glob("*.jsonl"))]
    assert not (synth.write_day(tmp_path / "c", dt, 20_000, n_items=5_000, seed=4, bad_share=0.02, files=3)
                ["bad"] == m["bad"] and (tmp_path / "c" / "events" / f"dt={dt}" / "part-0000.jsonl").read_bytes()
                == files[0].read_bytes())

    lines = _lines(tmp_path / "a", dt)
    assert len(lines) == 20_000 and 300 <= m["bad_total"] <= 500 and all(m["bad"].values())
    known = {synth.item_id(k) for k in range(5_000)}
    good, bad = reference_ingest(lines, dt, 86_400, known, set())
    assert len(bad) == m["bad_total"] and len(good) == 20_000 - m["bad_total"]
    got = Counter(b["reason"].split(":")[0] for b in bad)
    assert got == {k: v for k, v in m["bad"].items() if v}
    # Zipf: the head is heavy, the tail long
    items = Counter(json.loads(ln)["item_id"] for _, _, ln in lines if ln.endswith("}") and '"item_id":"I' in ln)
    users = Counter(json.loads(ln).get("user_id") for _, _, ln in lines if ln.endswith("}"))
    for counts in (items, users):  # the top id is drawn far more often than the mean id
        assert counts.most_common(1)[0][1] > 5 * sum(counts.values()) / len(counts) and len(counts) > 1_000
    assert users.most_common(1)[0][1] < 0.05 * sum(users.values())  # no one user holds a big share of the day
