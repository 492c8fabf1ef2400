"""`kd2edge evaluate`: JSON output and one-line errors."""

from __future__ import annotations

import json

from kd2edge.cli import main


def test_cli_json(tiny_llama_dir, squad_file, tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    code = main(["evaluate", "--model", str(tiny_llama_dir), "--data", str(squad_file), "--shots", "0",
                 "--limit", "2", "--max-new-tokens", "3", "--predictions", str(preds), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 2 and 0.0 <= result["em"] <= result["f1"] <= 1.0
    assert len(preds.read_text().splitlines()) == 2


def test_cli_summary_table_all_items(tiny_llama_dir, squad_file, capsys):
    assert main(["evaluate", "--model", str(tiny_llama_dir), "--data", str(squad_file), "--shots", "0",
                 "--limit", "0", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "0-shot" in out and "items  n  em" in out
    assert out.splitlines()[-1].split()[:2] == ["all", "4"]   # --limit 0: every item


def test_cli_errors_are_one_line(tmp_path, squad_file, capsys):
    (tmp_path / "notamodel").mkdir()
    code = main(["evaluate", "--model", str(tmp_path / "notamodel"), "--data", str(squad_file)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 2 and err[-1].startswith("error:") and "config.json" in err[-1]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code = main(["evaluate", "--model", "embedded", "--data", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("error:") and "bad.json" in err[-1]
    code = main(["evaluate", "--model", "x", "--shots", "2"])
    assert code == 2
