import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minillm.data import (HEADER_BYTES, DataError, MixtureLoader, ShardWriter, TokenDataset,
                          TokenLoader, eval_batches, is_validation, open_shard, prepare, read_header)
from minillm.tokenizer import train_bpe


def write_docs(directory, docs, vocab_size=1000, eot=999, shard_tokens=10_000, prefix="train"):
    with ShardWriter(directory, prefix, vocab_size, eot, shard_tokens) as w:
        for d in docs:
            w.add(d)
    return w.paths


def arange_dataset(tmp_path, n, shard_tokens=10**9):
    """A dataset whose token i is i % 60000, no separators: windows are easy to identify."""
    with ShardWriter(tmp_path, "train", 60_000, None, shard_tokens) as w:
        w.add(np.arange(n) % 60_000)
    return TokenDataset(w.paths)


# --- shards ---------------------------------------------------------------------------------------

def test_shards_hold_documents_separated_by_eot(tmp_path):
    docs = [[1, 2, 3], [4], [], [5, 6]]
    paths = write_docs(tmp_path, docs, shard_tokens=4)
    tokens = np.concatenate([np.asarray(open_shard(p)[1]) for p in paths])
    assert tokens.tolist() == [1, 2, 3, 999, 4, 999, 999, 5, 6, 999]
    assert [len(open_shard(p)[1]) for p in paths] == [4, 4, 2]  # rolls over mid-document
    assert [p.name for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("vocab_size,dtype", [(65_536, np.uint16), (65_537, np.uint32)])
def test_dtype_follows_vocab_size(tmp_path, vocab_size, dtype):
    paths = write_docs(tmp_path, [[0, vocab_size - 1]], vocab_size=vocab_size, eot=0)
    header, tokens = open_shard(paths[0])
    assert tokens.dtype == dtype and header.itemsize == np.dtype(dtype).itemsize
    assert tokens.tolist() == [0, vocab_size - 1, 0]
    assert header.vocab_size == vocab_size and header.eot_id == 0


def test_writer_refuses_ids_beyond_vocab(tmp_path):
    with pytest.raises(DataError, match="token id 1000 outside the vocabulary of size 1000"):
        write_docs(tmp_path, [[1, 1000]])
    with pytest.raises(DataError, match="token id -1"):
        write_docs(tmp_path, [[-1]])


def test_bad_shards_give_clear_errors(tmp_path):
    [path] = write_docs(tmp_path, [[1, 2, 3, 4]])
    with pytest.raises(DataError, match="shard not found: .*nope.bin"):
        read_header(tmp_path / "nope.bin")
    data = path.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-2])
    with pytest.raises(DataError, match="cut.bin: truncated or corrupt shard: header says 5 tokens"):
        read_header(cut)
    cut.write_bytes(data[:10])
    with pytest.raises(DataError, match="cut.bin: truncated shard"):
        read_header(cut)
    magic = tmp_path / "magic.bin"
    magic.write_bytes(b"NOTTOKEN" + data[8:])
    with pytest.raises(DataError, match="magic.bin: not a minillm token shard"):
        read_header(magic)
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(data[:HEADER_BYTES] + struct.pack("<H", 5000) + data[HEADER_BYTES + 2:])
    with pytest.raises(DataError, match="corrupt.bin: token id 5000 beyond"):
        TokenDataset(corrupt)
    with pytest.raises(DataError, match="vocabulary of 1000 ids, the model has 500"):
        TokenDataset(path, vocab_size=500)


def test_empty_dataset_and_too_long_block(tmp_path):
    with ShardWriter(tmp_path, "empty", 100, None) as w:
        w.add([], separator=False)
    assert w.paths == []
    [path] = write_docs(tmp_path, [[1, 2, 3, 4]])  # 5 tokens with the separator
    empty = tmp_path / "zero.bin"
    empty.write_bytes(path.read_bytes()[:HEADER_BYTES].replace(struct.pack("<Q", 5), struct.pack("<Q", 0), 1))
    with pytest.raises(DataError, match="empty dataset"):
        TokenDataset(empty)
    ds = TokenDataset(path)
    assert len(TokenLoader(ds, block_size=4, rank=0, world_size=1).next_windows(1)[0]) == 5
    with pytest.raises(DataError, match="block size 5 is too long for the data"):
        TokenLoader(ds, block_size=5, rank=0, world_size=1)
    with pytest.raises(DataError, match="no meta.json"):
        TokenDataset(tmp_path)


# --- prepare -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return train_bpe(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)


def test_prepare_writes_train_and_val_that_decode_to_the_documents(tmp_path, tok):
    docs = [f"document number {i}: the fox" for i in range(50)]
    meta = prepare(docs, tok, tmp_path, val_fraction=0.1, shard_tokens=64, workers=2,
                   chunk_documents=7, progress=False)
    assert meta["splits"]["val"]["documents"] == 5 and meta["splits"]["train"]["documents"] == 45
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    for split in ("train", "val"):
        ds = TokenDataset(tmp_path, split)
        text = tok.decode(np.concatenate([np.asarray(s) for s in ds.shards]).tolist())
        expected = [d for i, d in enumerate(docs) if is_validation(i, 0.1) == (split == "val")]
        assert text == "".join(d + "<|endoftext|>" for d in expected)
        assert len(ds) == meta["splits"][split]["tokens"]
    assert len(meta["splits"]["train"]["shards"]) > 1


def test_prepare_replaces_an_unfinished_run(tmp_path, tok):
    (tmp_path / "train_000007.bin").write_bytes(b"left over")
    (tmp_path / "train_000000.bin.tmp").write_bytes(b"half")
    (tmp_path / "notes.bin").write_bytes(b"not ours: kept")
    prepare(["a fox", "a dog"], tok, tmp_path, val_fraction=0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "notes.bin", "tokenizer.json",
                                                          "train_000000.bin"]


def test_prepare_with_no_documents_fails(tmp_path, tok):
    with pytest.raises(DataError, match="no training tokens: the input held 0 document"):
        prepare([], tok, tmp_path, progress=False)
    assert not (tmp_path / "meta.json").exists()


def test_validation_fraction_is_exact():
    assert sum(is_validation(i, 0.01) for i in range(1000)) == 10
    assert is_validation(0, 0.01)


# --- loader --------------------------------------------------------------------------------------

def test_windows_cover_each_epoch_once_and_targets_are_shifted(tmp_path):
    ds = arange_dataset(tmp_path, 1001)  # 100 windows of block 10
    loader = TokenLoader(ds, block_size=10, batch_size=4, seed=3, rank=0, world_size=1)
    starts = [int(w[0]) for w in loader.next_windows(100)]
    assert sorted(starts) == list(range(0, 1000, 10))
    assert starts != sorted(starts)  # shuffled
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert loader.epoch == 1


def test_windows_never_cross_shards(tmp_path):
    ds = arange_dataset(tmp_path, 105, shard_tokens=35)  # 3 shards of 35: 3 windows of 11 each
    loader = TokenLoader(ds, block_size=10, shuffle=False, rank=0, world_size=1)
    windows = loader.next_windows(9)
    assert [int(w[0]) for w in windows] == [0, 10, 20, 35, 45, 55, 70, 80, 90]
    assert all((np.diff(w) == 1).all() for w in windows)


def test_same_seed_same_stream_other_seed_other_stream(tmp_path):
    ds = arange_dataset(tmp_path, 5000)
    a = TokenLoader(ds, 16, seed=1, rank=0, world_size=1).next_windows(50)
    b = TokenLoader(ds, 16, seed=1, rank=0, world_size=1).next_windows(50)
    c = TokenLoader(ds, 16, seed=2, rank=0, world_size=1).next_windows(50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@given(st.integers(0, 120), st.booleans())
def test_restored_loader_continues_the_same_stream(tmp_path_factory, split_at, shuffle):
    ds = arange_dataset(tmp_path_factory.mktemp("d"), 800)
    reference = TokenLoader(ds, 16, seed=5, shuffle=shuffle, rank=0, world_size=1).next_windows(120)
    first = TokenLoader(ds, 16, seed=5, shuffle=shuffle, rank=0, world_size=1)
    head = first.next_windows(split_at)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    second = TokenLoader(ds, 16, seed=5, shuffle=shuffle, rank=0, world_size=1)
    second.load_state_dict(state)
    tail = second.next_windows(120 - split_at)
    assert np.array_equal(np.concatenate([head, tail]), reference)


def test_state_from_another_layout_is_refused(tmp_path):
    ds = arange_dataset(tmp_path, 800)
    state = TokenLoader(ds, 16, rank=0, world_size=1).state_dict()
    with pytest.raises(ValueError, match="block_size=16 but this loader has 32"):
        TokenLoader(ds, 32, rank=0, world_size=1).load_state_dict(state)


def test_ranks_split_each_epoch_without_overlap(tmp_path):
    ds = arange_dataset(tmp_path, 1001)  # 100 windows of block 10
    per_rank = [TokenLoader(ds, 10, seed=0, rank=r, world_size=3).next_windows(33) for r in range(3)]
    starts = [set(int(s) for s in w[:, 0]) for w in per_rank]
    assert all(len(s) == 33 for s in starts)
    assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
    assert len(starts[0] | starts[1] | starts[2]) == 99  # one window dropped to keep ranks even


def test_eval_batches_are_fixed(tmp_path):
    ds = arange_dataset(tmp_path, 1001)
    a = [(x, rows) for x, _, rows in eval_batches(ds, 10, 8, rank=0, world_size=1)]
    b = [(x, rows) for x, _, rows in eval_batches(ds, 10, 8, max_windows=24, rank=0, world_size=1)]
    assert [rows for _, rows in a] == [8] * 12 + [4] and [rows for _, rows in b] == [8] * 3
    assert all(torch.equal(p, q) for (p, _), (q, _) in zip(a, b))
    assert a[0][0][:, 0].tolist() == list(range(0, 80, 10))
    # 3 ranks, 8 windows: rank 0 gets windows 0, 3, 6; rank 2 only 2 and 5, yet both yield two
    # batches; a batch with no window left is one row whose targets are all ignored.
    ranks = [list(eval_batches(ds, 10, 2, max_windows=8, rank=r, world_size=3)) for r in range(3)]
    assert [[rows for _, _, rows in r] for r in ranks] == [[2, 1], [2, 1], [2, 0]]
    assert ranks[0][1][0][:, 0].tolist() == [60]
    assert (ranks[2][1][1] == -100).all()


# --- mixtures ------------------------------------------------------------------------------------

def domain_loaders(tmp_path, offsets=(0, 20_000, 40_000)):
    loaders = {}
    for name, offset in zip("abc", offsets):
        with ShardWriter(tmp_path / name, "train", 60_000, None) as w:
            w.add(offset + np.arange(5000))
        loaders[name] = TokenLoader(TokenDataset(w.paths), 8, seed=1, rank=0, world_size=1)
    return loaders


def test_mixture_follows_weights_and_reports_domains(tmp_path):
    mix = MixtureLoader(domain_loaders(tmp_path), {"a": 0.6, "b": 0.4, "c": 0.0}, batch_size=64)
    rows = []
    for _ in range(20):
        x, y, domain = mix.next_batch()
        assert x.shape == (64, 8)
        # every row comes from the domain it is labelled with
        assert torch.equal(x[:, 0] // 20_000, domain)
        rows.append(domain)
    share = torch.bincount(torch.cat(rows), minlength=3).double() / (20 * 64)
    assert abs(share[0] - 0.6) < 0.05 and share[2] == 0
    mix.set_weights({"a": 0, "b": 0, "c": 1})
    assert (mix.next_batch()[2] == 2).all()


def test_mixture_state_restores_the_stream(tmp_path):
    weights = {"a": 1, "b": 2, "c": 3}
    ref = MixtureLoader(domain_loaders(tmp_path), weights, batch_size=16)
    expected = [ref.next_batch()[0] for _ in range(6)]
    first = MixtureLoader(domain_loaders(tmp_path), weights, batch_size=16)
    got = [first.next_batch()[0] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    second = MixtureLoader(domain_loaders(tmp_path), {"a": 1, "b": 1, "c": 1}, batch_size=16)
    second.load_state_dict(state)
    got += [second.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(expected, got))


def test_mixture_rejects_bad_weights(tmp_path):
    loaders = domain_loaders(tmp_path)
    with pytest.raises(ValueError, match="domains are"):
        MixtureLoader(loaders, {"a": 1}, batch_size=4)
    with pytest.raises(ValueError, match="non-negative"):
        MixtureLoader(loaders, {"a": -1, "b": 1, "c": 1}, batch_size=4)
