import importlib.util
import json
from pathlib import Path

from minillm.checkpoint import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py"


def test_quickstart_tiny_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    quickstart.main(["--tiny", "true", "--out-dir", str(tmp_path / "out"),
                     "--data-dir", str(tmp_path / "data")])
    printed = capsys.readouterr().out
    assert "samples before training" in printed and "samples after training" in printed
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    model, tok, _ = load_model(tmp_path / "out" / "model.pt")
    assert tok is not None and model.config.vocab_size == tok.vocab_size
