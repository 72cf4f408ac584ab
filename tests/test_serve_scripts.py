"""End to end: scripts/serve.py serves a tiny checkpoint in its own process, and the evaluation
scripts run against it over HTTP, each in a subprocess: LLMBar (verdicts by echoed log-probs,
which must equal the verdicts of the same checkpoint scored in process), AoR with an LLM judge,
and Query of CC with the LM expander."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from minillm.checkpoint import load_model, save_model  # noqa: E402
from minillm.errors import run_main  # noqa: E402
from minillm.generate import LocalLM  # noqa: E402
from minillm.model import GPT, ModelConfig  # noqa: E402
from minillm.tasks import Arithmetic  # noqa: E402
from minillm.tokenizer import train_bpe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TEXT = ["Output (a) follows the instruction. Output (b) does not. Solution 1: 7/10",
        "def add(x, y):\n    return x + y\n", "The quick brown fox jumps over the lazy dog."]


def run_script(name, *args, timeout=300):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = train_bpe(TEXT * 4, vocab_size=320)
    torch.manual_seed(0)
    # RoPE and 4,096 positions: LLMBar's prompts are long in a byte-level vocabulary this small
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=4096, n_layer=2, n_head=2,
                            n_embd=32, position="rope", norm="rmsnorm", activation="swiglu"))
    path = tmp_path_factory.mktemp("served") / "model.pt"
    save_model(path, model, tok)
    return path


@pytest.fixture(scope="module")
def served(checkpoint):
    """scripts/serve.py on a free port of 127.0.0.1: its API root; stopped by SIGINT."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint",
                             str(checkpoint), "--served-model-name", "tiny", "--port", "0",
                             "--threads", "1", "--log-level", "warning"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() else line
        yield line.rsplit(" at ", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, proc.stderr.read()[-2000:]


def test_the_script_serves_the_checkpoint(served, checkpoint):
    (card,) = get(served + "/models")["data"]
    assert card["id"] == "tiny" and card["max_model_len"] == 4096
    body = json.dumps({"model": "tiny", "prompt": "The quick", "max_tokens": 8,
                       "temperature": 0}).encode()
    request = urllib.request.Request(served + "/completions", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=60) as r:
        text = json.loads(r.read())["choices"][0]["text"]
    model, tok, _ = load_model(checkpoint)
    assert text == LocalLM(model, tok).generate(["The quick"], 8)[0]


@pytest.mark.parametrize("args, message", [
    ([], "give one of --checkpoint FILE and --hf FOLDER"),
    (["--checkpoint", "no/such.pt"], "no such file"),
    (["--hf", "no/such/folder"], "no such folder"),
    (["--checkpoint", "x.pt", "--max-batch", "0"], "--max-batch 0"),
    (["--checkpoint", "x.pt", "--dtype", "int8"], "--dtype 'int8'"),
    (["--checkpoint", "x.pt", "--port", "70000"], "--port 70000"),
])
def test_script_mistakes_are_one_line(args, message, capsys):
    spec = importlib.util.spec_from_file_location("serve_script", ROOT / "scripts" / "serve.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        run_main(script.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_llmbar_over_http_gives_the_verdicts_of_the_local_checkpoint(served, checkpoint, tmp_path):
    common = ["--per-family", "1", "--strategy", "vanilla", "swap", "--limit", "3"]
    run_script("llmbar.py", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "local"),
               *common)
    out = run_script("llmbar.py", "--base-url", served, "--model", "tiny", "--api", "completions",
                     "--verdict-by", "score", "--out-dir", str(tmp_path / "http"), *common)
    assert f"tiny at {served} (completions)" in out
    local, http = (json.loads((tmp_path / d / "results.json").read_text())["strategies"]
                   for d in ("local", "http"))
    for name in ("vanilla", "swap"):
        assert http[name]["stats"]["scored"] == local[name]["stats"]["scored"] > 0
    # A random model's margins for the two orders of a pair are equal to about 1e-6, so swap's
    # sum of them is float noise, and a tie locally need not be one over HTTP (scores agree to
    # 1e-4, not bitwise). Vanilla's margins (about 0.3) are far above that.
    for subset, report in local["vanilla"].items():
        if subset not in ("stats", "seconds"):
            assert http["vanilla"][subset] == report, subset
    # the chat endpoint and verdicts read from generated text
    before = get(served.removesuffix("/v1") + "/health")["requests"]
    run_script("llmbar.py", "--base-url", served, "--model", "tiny", "--max-new-tokens", "4",
               "--per-family", "1", "--strategy", "vanilla", "--limit", "1",
               "--out-dir", str(tmp_path / "chat"))
    chat = json.loads((tmp_path / "chat" / "results.json").read_text())["strategies"]["vanilla"]
    assert chat["stats"]["generations"] > 0
    assert get(served.removesuffix("/v1") + "/health")["requests"] > before


def test_aor_judges_with_the_served_model(served, tmp_path):
    args = ["--tiny", "--questions", "2", "--threads", "1", "--out-dir", str(tmp_path),
            "--judge-url", served,
            "--judge-model", "tiny", "--judge-max-new-tokens", "8"]
    # A policy trained for seconds writes no answers, and chains without one are never judged:
    # the sample cache gets worked solutions instead, half of them with a wrong answer.
    spec = importlib.util.spec_from_file_location("aor_script", ROOT / "scripts" / "aor.py")
    aor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aor)
    cfg = aor.resolve(aor.parse_config(aor.AoRScriptConfig, args), args)
    pcfg, _, key = aor.sample_settings(cfg)
    problems = Arithmetic(ops=pcfg.ops).problems(cfg.level, cfg.questions, "test", cfg.seed)
    chains = [[p.solution if k % 2 else f"A: {int(p.answer) + 1}" for k in range(cfg.max_samples)]
              for p in problems]
    (tmp_path / "samples.json").write_text(json.dumps({"key": key, "chains": chains}))
    out = run_script("aor.py", *args)
    results = json.loads((tmp_path / "results.json").read_text())
    stats = results["llm_judge"]
    assert stats["prompts"] > 0 and stats["chains"] > 0 and stats["completion_tokens"] > 0
    assert f"LLM judge tiny at {served}: {stats['prompts']} prompts" in out
    assert "AoR@4, LLM tiny" in results["rows"]


@pytest.mark.slow  # the script parses the standard library for its corpus: 10-20 s
def test_query_of_cc_expands_with_the_served_model(served, tmp_path):
    before = get(served.removesuffix("/v1") + "/health")["requests"]
    # the first 2,133 documents hold every domain (fewer leave one empty, which the script's
    # recall divides by)
    run_script("query_of_cc.py", "--http-url", served, "--http-model", "tiny", "--max-docs",
               "2200", "--rounds", "1", "--samples-per-round", "2", "--max-new-tokens", "8",
               "--out", str(tmp_path))
    assert get(served.removesuffix("/v1") + "/health")["requests"] > before
    pools = json.loads((tmp_path / "queries.json").read_text())
    assert pools and (tmp_path / "evaluation.json").is_file()
