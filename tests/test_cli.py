from dataclasses import dataclass, field

import pytest

from minillm.cli import parse_config


@dataclass
class Config:
    name: str = "run"
    steps: int = 10
    lr: float = 1e-3
    shuffle: bool = True
    data: list[str] = field(default_factory=lambda: ["default"], metadata={"help": "inputs"})
    out: str | None = None


def test_fields_become_flags_with_defaults():
    assert parse_config(Config, []) == Config()
    cfg = parse_config(Config, ["--steps", "5", "--lr", "0.5", "--shuffle", "false",
                                "--data", "a.txt", "b.jsonl", "--out", "x"])
    assert cfg == Config(steps=5, lr=0.5, shuffle=False, data=["a.txt", "b.jsonl"], out="x")
    assert parse_config(Config, ["--data", "a", "--data", "b"]).data == ["a", "b"]
    assert Config().data == ["default"]  # the default list was not extended in place


def test_bad_values_are_refused(capsys):
    with pytest.raises(SystemExit):
        parse_config(Config, ["--steps", "many"])
    with pytest.raises(SystemExit):
        parse_config(Config, ["--shuffle", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


@dataclass
class Flags:
    tiny: bool = False
    steps: int = 10


def test_a_boolean_flag_alone_means_true_and_still_takes_a_value():
    assert parse_config(Flags, ["--tiny"]).tiny is True
    assert parse_config(Flags, ["--tiny", "--steps", "3"]) == Flags(tiny=True, steps=3)
    assert parse_config(Flags, ["--tiny", "false"]).tiny is False
    assert parse_config(Flags, []).tiny is False
    assert parse_config(Config, ["--shuffle", "no"]).shuffle is False
