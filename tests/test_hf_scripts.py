"""A user's mistakes with checkpoints and with scripts/convert.py and scripts/sample.py: one line
on stderr, exit status 2, naming the file and what was expected; and the Llama-2 folder converts."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm.errors import UserError, run_main
from minillm.model import GPT, ModelConfig
from minillm.checkpoint import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(capsys, main, argv) -> str:
    """Run `main(argv)` as the script does; the error line it prints (status 2, nothing else)."""
    with pytest.raises(SystemExit) as exit_:
        run_main(main, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def not_checkpoints(tmp_path) -> dict[str, Path]:
    torch.save({"a": torch.ones(4)}, tmp_path / "good.pt")
    zipped = (tmp_path / "good.pt").read_bytes()
    files = {"random": os.urandom(4096), "text": b"hello, this is a text file\n", "empty": b"",
             "truncated": zipped[:len(zipped) // 2]}
    paths = {}
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
        paths[name] = tmp_path / f"{name}.pt"
    torch.save({"a": np.ones(3)}, tmp_path / "objects.pt")  # needs weights_only=False to load
    paths["objects"] = tmp_path / "objects.pt"
    paths["state-dict"] = tmp_path / "good.pt"  # a PyTorch file, but not a minillm checkpoint
    return paths


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    reasons = {"random": "not a PyTorch file", "text": "not a PyTorch file", "empty": "not a PyTorch file",
               "truncated": "a damaged or truncated PyTorch file",
               "objects": "holds Python objects other than tensors", "state-dict": "a PyTorch file, but not"}
    for name, path in not_checkpoints(tmp_path).items():
        with pytest.raises(UserError) as e:
            load_model(path)
        message = str(e.value)
        assert message.startswith(f"{path}: {reasons[name]}"), message
        assert "a minillm model (save_model) or training checkpoint (ckpt_*.pt)" in message
        assert "weights_only" not in message and "\n" not in message


def test_legacy_checkpoint_file_loads(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY)).eval()
    save_model(tmp_path / "m.pt", model)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save(blob, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    back, tok, _ = load_model(tmp_path / "old.pt")
    x = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits) and tok is None


# --- scripts ---------------------------------------------------------------------------------------

def run_script(name, args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=120)


def test_scripts_without_arguments_answer_in_one_line(tmp_path):
    for name, expected in (("sample", "error: no --checkpoint given and no model.pt or ckpt_*.pt under out/"),
                           ("convert", "error: both --source and --dest are required")):
        out = run_script(name, [], tmp_path)
        assert out.returncode == 2 and out.stderr.startswith(expected), out.stderr
        assert out.stderr.count("\n") == 1 and out.stdout == ""


def test_sample_finds_the_newest_checkpoint_and_says_which(tmp_path, capsys):
    from minillm.tokenizer import train_bpe

    tok = train_bpe(["the cat sat on the mat. " * 20, "a dog ran. " * 20], vocab_size=270)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "vocab_size": tok.vocab_size}))
    (tmp_path / "out" / "old").mkdir(parents=True)
    (tmp_path / "out" / "new").mkdir()
    save_model(tmp_path / "out" / "old" / "model.pt", model, tok)
    save_model(tmp_path / "out" / "new" / "ckpt_0000010.pt", model, tok)
    os.utime(tmp_path / "out" / "old" / "model.pt", (1, 1))
    sample = script("sample")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sample.main(["--prompt", "the", "--max-new-tokens", "3", "--device", "cpu"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    assert out.err == ("no --checkpoint given; sampling from out/new/ckpt_0000010.pt, "
                       "the newest under out/\n")
    assert out.out.startswith("--- 'the'\nthe")
    checkpoint = str(tmp_path / "out" / "new" / "ckpt_0000010.pt")
    for argv, expected in (
            (["--checkpoint", str(tmp_path / "nope.pt")], f"--checkpoint {tmp_path / 'nope.pt'}: no such file"),
            (["--checkpoint", checkpoint, "--prompt", "x<|endoftext|>"], "--prompt 'x<|endoftext|>': "),
            (["--checkpoint", checkpoint, "--max-new-tokens", "40"], "prompt of 1 tokens + 40 new tokens"),
            (["--checkpoint", checkpoint, "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
            (["--checkpoint", checkpoint, "--device", "tpu"], "--device 'tpu': expected auto, cpu")):
        assert one_line_error(capsys, sample.main, argv).startswith("error: " + expected)
    if not torch.cuda.is_available():
        err = one_line_error(capsys, sample.main, ["--checkpoint", checkpoint, "--device", "cuda"])
        assert err == "error: --device cuda: no CUDA GPU is visible; pass --device cpu or auto\n"
    for name, path in not_checkpoints(tmp_path).items():
        err = one_line_error(capsys, sample.main, ["--checkpoint", str(path)])
        assert err.startswith(f"error: {path}: ") and "weights_only" not in err


def test_convert_mistakes_are_one_line(tmp_path, capsys):
    convert = script("convert")
    torch.manual_seed(0)
    save_model(tmp_path / "m.pt", GPT(ModelConfig(**TINY)))
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    for argv, expected in (
            (["--source", str(tmp_path / "missing"), "--dest", "x"], "--source"),
            (["--source", str(tmp_path / "m.pt"), "--dest", str(tmp_path / "file")], "--dest"),
            (["--source", str(tmp_path / "m.pt"), "--dest", "x", "--dtype", "int4"], "--dtype 'int4'"),
            (["--source", str(tmp_path / "folder"), "--dest", str(tmp_path / "o.pt")],
             f"{tmp_path / 'folder' / 'config.json'} not found"),
            (["--source", str(tmp_path / "file"), "--dest", str(tmp_path / "hf")], f"{tmp_path / 'file'}: ")):
        assert one_line_error(capsys, convert.main, argv).startswith("error: " + expected)


def test_convert_a_llama2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from tests.test_hf_inputs import spm_proto

    from minillm.corpus import stdlib_docstrings

    docs = list(stdlib_docstrings(max_files=10))
    proto = spm_proto(docs)
    folder = tmp_path / "llama2"
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(proto)
    transformers.LlamaTokenizer.from_pretrained(tmp_path / "spm").save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(proto)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, bos_token_id=1, eos_token_id=2)).eval()
    ref.save_pretrained(folder)
    convert = script("convert")
    convert.main(["--source", str(folder), "--dest", str(tmp_path / "m.pt")])
    model, tok, _ = load_model(tmp_path / "m.pt")
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert all(tok.encode_ordinary(d) == sp.encode(d) for d in docs[:50])
    x = torch.tensor([tok.encode_ordinary(docs[0])[:30]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    convert.main(["--source", str(tmp_path / "m.pt"), "--dest", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == proto
