"""Reading a run's `metrics.jsonl` and drawing it: loss curves (train and every validation domain)
and the learning rate. matplotlib is an optional extra (`pip install -e .[plot]`); without it the
same numbers are printed as a table."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file, one dict per line; a malformed line names its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed metrics line ({e.msg})") from None
    return records


def series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs for `loss`, `lr` and every `val_loss*` key (the mean `val_loss` is left
    out when there is a single domain: it equals that domain's curve)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in ("loss", "lr") or key.startswith("val_loss"):
                out.setdefault(key, []).append((r["step"], value))
    if sum(k.startswith("val_loss/") for k in out) == 1:
        out.pop("val_loss", None)
    return out


def loss_table(records: list[dict]) -> str:
    s = series(records)
    keys = ["loss"] + sorted(k for k in s if k.startswith("val_loss"))
    by_step: dict[int, dict[str, float]] = {}
    for key in keys:
        for step, value in s.get(key, []):
            by_step.setdefault(step, {})[key] = value
    lines = ["step".rjust(6) + "".join(k.rjust(20) for k in keys)]
    for step in sorted(by_step):
        row = by_step[step]
        lines.append(str(step).rjust(6) + "".join(
            (f"{row[k]:.4f}" if k in row else "-").rjust(20) for k in keys))
    return "\n".join(lines)


def plot_metrics(path: str | Path, out_png: str | Path) -> bool:
    """Draw losses and lr of the metrics file at `path` to `out_png`; False if matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = series(read_metrics(path))
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    for key, points in sorted(s.items()):
        if key == "lr":
            ax_lr.plot(*zip(*points), color="gray")
        else:
            ax_loss.plot(*zip(*points), "o-" if key.startswith("val") else "-", label=key,
                         markersize=3)
    ax_loss.set_ylabel("loss (nats / token)")
    ax_loss.legend()
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
