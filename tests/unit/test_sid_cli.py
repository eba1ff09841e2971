"""CLI wiring of sid-report (the Spark-backed paths are exercised by the pipeline tests)."""

from __future__ import annotations

import json

from onerec_prod import cli
from tests.conftest import BEAUTY_DIR, REPO


def _run(tmp_path, *argv):
    base = ["--config", str(REPO / "configs" / "test.yaml"), "--set", f"paths.var_root={tmp_path}",
            "--set", f"paths.dataset_dir={BEAUTY_DIR}"]
    return cli.main(base + list(argv))


def test_sid_report_letter_json(tmp_path, capsys):
    assert _run(tmp_path, "sid-report", "--letter", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "LETTER"
    assert out["report"]["n_items"] == 12101 and out["report"]["unique_sids"] == 12088


def test_sid_report_without_codebook_explains(tmp_path, capsys):
    assert _run(tmp_path, "sid-report") == 2
    assert "no SID codebook yet" in capsys.readouterr().out
