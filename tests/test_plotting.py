import json
import sys

import pytest

from minillm.plotting import loss_table, plot_metrics, read_metrics, series


@pytest.fixture
def metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 10, "loss": 5.0, "lr": 1e-3}, {"step": 20, "loss": 4.0, "lr": 5e-4},
               {"step": 20, "val_loss/web": 4.5, "val_loss/code": 3.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_series_and_table(metrics):
    s = series(read_metrics(metrics))
    assert s["loss"] == [(10, 5.0), (20, 4.0)] and s["val_loss/web"] == [(20, 4.5)]
    table = loss_table(read_metrics(metrics)).splitlines()
    assert table[0].split() == ["step", "loss", "val_loss/code", "val_loss/web"]
    assert table[2].split() == ["20", "4.0000", "3.5000", "4.5000"]


def test_plot_writes_a_png(metrics, tmp_path):
    assert plot_metrics(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_no_png(metrics, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plot_metrics(metrics, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_malformed_metrics_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1}\n{oops\n')
    with pytest.raises(ValueError, match="m.jsonl:2: malformed metrics line"):
        read_metrics(bad)
