import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from minillm.errors import run_main
from minillm.model import GPT, ModelConfig
from minillm.checkpoint import save_model
from minillm.tokenizer import train_bpe

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llmbar.py"


@pytest.fixture(scope="module")
def llmbar():
    spec = importlib.util.spec_from_file_location("llmbar_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_runs_a_local_checkpoint_on_the_constructed_set_and_writes_results(tmp_path, llmbar,
                                                                                  capsys):
    tok = train_bpe(["Output (a) follows the instruction. Output (b) does not."] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=512, n_layer=1, n_head=2,
                            n_embd=16))
    save_model(tmp_path / "model.pt", model, tok)
    llmbar.main(["--checkpoint", str(tmp_path / "model.pt"), "--per-family", "1", "--strategy",
                 "vanilla", "swap", "--out-dir", str(tmp_path / "out"), "--save-constructed",
                 str(tmp_path / "set")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    scripted = results["strategies"]["scripted: always (a)"]
    assert scripted["Natural"]["accuracy"] == 0.5 and scripted["Natural"]["agreement"] == 0
    assert results["strategies"]["scripted: the longer output"]["Adversarial/Constructed"][
        "accuracy"] == 0
    for name in ("vanilla", "swap"):
        r = results["strategies"][name]["Natural"]
        assert r["n"] == 8 and 0 <= r["accuracy"] <= 1
        assert results["strategies"][name]["stats"]["scored"] > 0
    # the written set is in the released layout and reads back through --data
    capsys.readouterr()
    llmbar.main(["--checkpoint", str(tmp_path / "model.pt"), "--data", str(tmp_path / "set"),
                 "--strategy", "vanilla", "--limit", "2", "--out-dir", str(tmp_path / "out2")])
    assert "Adversarial/Constructed (2)" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--base-url", "http://127.0.0.1:9/v1"], "go together"),
    (["--strategy", "rulez"], "strategy 'rulez'"),
    (["--data", "no/such/folder"], "no such folder"),
    (["--base-url", "http://x/v1", "--model", "m", "--verdict-by", "score"], "chat endpoint"),
])
def test_script_mistakes_are_one_line(tmp_path, llmbar, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        run_main(llmbar.main, [*args, "--out-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_script_judges_with_a_served_model(tmp_path, llmbar, capsys):
    from tests.test_backends import Server

    lock, calls = threading.Lock(), []

    def handle(path, payload, headers):  # a chat server that always answers "(a)", once garbled
        with lock:
            calls.append(path)
            content = "no idea" if len(calls) == 1 else "Verdict: Output (a)"
        return 200, {"choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 5}}
    server = Server(handle)
    try:
        llmbar.main(["--base-url", server.url, "--model", "m", "--per-family", "1", "--strategy",
                     "vanilla", "--out-dir", str(tmp_path / "out")])
    finally:
        server.close()
    results = json.loads((tmp_path / "out" / "results.json").read_text())["strategies"]["vanilla"]
    assert results["stats"]["generations"] == 32 and results["stats"]["unparsed"] == 1
    assert results["stats"]["completion_tokens"] == 32 * 5
    ties = results["Natural"]["ties"] + results["Adversarial/Constructed"]["ties"]
    assert set(calls) == {"/v1/chat/completions"}
    assert ties == 1 and "1 unparseable answers (counted as ties)" in capsys.readouterr().out
