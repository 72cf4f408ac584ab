import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch

from minillm.errors import UserError
from minillm.generate import continuation_logprobs, generate_ids
from minillm.methods.knowledge_plugin import (KGVocab, KnowledgeEmbeddings, KnowledgePlugin, Link,
                                              MapperConfig, NameLinker, PluginLM, SpanError,
                                              TransEConfig, TripleFileError, UnknownEntityError,
                                              build_sequence, corrupt, evaluate_loss, frozen,
                                              link_prediction, load_knowledge,
                                              plugin_continuation_logprobs, plugin_generate_ids,
                                              read_triples, save_knowledge, sequence_loss,
                                              span_to_tokens, token_byte_spans, train_transe,
                                              tune_mapper, weights_digest)
from minillm.model import IGNORE_INDEX, GPT, ModelConfig
from minillm.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    text = "Paris is in France. The city of Paris, café Zoé. Tamiku went home. " * 20
    return train_bpe([text], vocab_size=320)


def _chain_graph(n=12):
    """People p0..p{n-1}, each with one of 3 jobs and one of 4 cities."""
    triples = [(f"p{i}", "job", f"job{i % 3}") for i in range(n)]
    triples += [(f"p{i}", "lives_in", f"city{i % 4}") for i in range(n)]
    return triples


# --- TransE --------------------------------------------------------------------------------------

def test_transe_ranks_true_tails_above_corrupted_ones():
    triples = _chain_graph()
    vocab = KGVocab.from_triples(triples)
    ids = vocab.encode(triples)
    untrained, _ = train_transe(ids, len(vocab.entities), len(vocab.relations),
                                TransEConfig(dim=16, epochs=0))
    model, losses = train_transe(ids, len(vocab.entities), len(vocab.relations),
                                 TransEConfig(dim=16, epochs=150, batch_size=8))
    assert losses[-1] < 0.2 * losses[0]
    gen = torch.Generator().manual_seed(1)
    neg = corrupt(ids.repeat(20, 1), len(vocab.entities), gen)
    # a corruption may redraw a true triple (another person with the same job): leave those out
    true = {tuple(t) for t in ids.tolist()}
    false = torch.tensor([tuple(t) not in true for t in neg.tolist()])
    with torch.no_grad():
        pos_d = model.distance(ids).repeat(20)
        assert (pos_d[false] < model.distance(neg)[false]).all()
    trained_lp = link_prediction(model, ids, ids)
    assert trained_lp["mean_rank"] < link_prediction(untrained, ids, ids)["mean_rank"]
    assert trained_lp["hits@10"] == 1.0
    # entity vectors obey the norm constraint
    assert torch.allclose(model.entity.weight.norm(dim=1), torch.ones(len(vocab.entities)))


def test_link_prediction_is_filtered():
    # Two true tails for one (head, relation): neither may push the other's rank down.
    vocab = KGVocab.from_triples([("a", "r", "b"), ("a", "r", "c")])
    model, _ = train_transe(vocab.encode([("a", "r", "b")]), 3, 1, TransEConfig(dim=4, epochs=0))
    with torch.no_grad():  # place c exactly at a + r, b farther: b's raw tail rank would be 2
        model.entity.weight[2] = model.entity.weight[0] + model.relation.weight[0]
        model.entity.weight[1] = model.entity.weight[2] + 0.1
    test = vocab.encode([("a", "r", "b")])
    known = vocab.encode([("a", "r", "b"), ("a", "r", "c")])
    tail_rank_filtered = link_prediction(model, test, known)
    assert tail_rank_filtered["n"] == 2
    with torch.no_grad():
        d = model.distance(torch.tensor([[0, 0, 1], [0, 0, 2]]))
    assert d[1] < d[0]  # unfiltered, c would rank above b
    model_unfiltered = link_prediction(model, test, test)
    assert tail_rank_filtered["mean_rank"] <= model_unfiltered["mean_rank"] - 0.5


def test_knowledge_round_trip_with_vocabularies(tmp_path):
    triples = _chain_graph(6)
    vocab = KGVocab.from_triples(triples)
    model, _ = train_transe(vocab.encode(triples), len(vocab.entities), len(vocab.relations),
                            TransEConfig(dim=8, epochs=2))
    save_knowledge(tmp_path / "k.pt", KnowledgeEmbeddings.from_transe(model, vocab))
    loaded = load_knowledge(tmp_path / "k.pt")
    assert loaded.vocab.entities == vocab.entities and loaded.vocab.relations == vocab.relations
    assert torch.equal(loaded.vectors[loaded.vocab.entity_id("p3")],
                       model.entity.weight[vocab.entity_id("p3")])


# --- triple files and names ----------------------------------------------------------------------

def test_triple_file_errors_name_the_line(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("# comment\na\tr\tb\n\nb\tr\tc\n")
    assert read_triples(good) == [("a", "r", "b"), ("b", "r", "c")]
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(TripleFileError, match="empty.tsv: no triples"):
        read_triples(empty)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tr\tb\nb r c\n")
    with pytest.raises(TripleFileError, match=r"bad.tsv:2: expected 3"):
        read_triples(bad)
    blank_field = tmp_path / "blank.tsv"
    blank_field.write_text("a\tr\tb\na\tr\tb\n\tr\tc\n")
    with pytest.raises(TripleFileError, match=r"blank.tsv:3:"):
        read_triples(blank_field)
    with pytest.raises(TripleFileError, match="not found"):
        read_triples(tmp_path / "missing.tsv")


def test_unknown_entity_is_a_named_error(tok):
    vocab = KGVocab.from_triples([("Paris", "in", "France")])
    with pytest.raises(UnknownEntityError, match="'Lyon'"):
        vocab.entity_id("Lyon")
    with pytest.raises(UnknownEntityError, match="'Lyon'"):
        build_sequence(tok, "Lyon is big.", [Link(0, 4, "Lyon")], vocab)
    with pytest.raises(UnknownEntityError, match="relation 'near'"):
        vocab.encode([("Paris", "near", "France")])


# --- spans -> tokens -------------------------------------------------------------------------------

def _mention(tok, text, start, end):
    ids = tok.encode_ordinary(text)
    first, last = span_to_tokens(text, token_byte_spans(tok, ids), start, end)
    return tok.decode(ids[first:last])


def test_span_widened_over_the_leading_space(tok):
    text = "The city of Paris, café Zoé."
    s = text.index("Paris")
    assert tok.encode_ordinary(" Paris")[0] in tok.encode_ordinary(text)  # one token " Paris"
    assert _mention(tok, text, s, s + 5) == " Paris"  # the space belongs to the token
    assert _mention(tok, text, s - 1, s + 5) == " Paris"  # the span may include it
    assert _mention(tok, text, s - 1, s + 6) == " Paris,"  # punctuation is its own token
    assert _mention(tok, text, s, s + 5 + 1) == " Paris,"
    assert _mention(tok, "Paris is in France.", 0, 5) == "Paris"  # start of text, no space
    assert _mention(tok, text, s, s + 6 + 1 - 1) == " Paris,"
    assert _mention(tok, "Paris is", 0, 6) == "Paris"  # trailing whitespace of a span is dropped


def test_span_with_multibyte_characters(tok):
    text = "The city of Paris, café Zoé."
    s = text.index("Zoé")
    assert _mention(tok, text, s, s + 3) == " Zoé"
    s = text.index("café")
    assert _mention(tok, text, s, s + 4) == " café"


def test_span_cutting_a_word_is_a_named_error(tok):
    text = "The city of Paris, café Zoé."
    s = text.index("Paris")
    with pytest.raises(SpanError, match="cuts the token ' Paris'"):
        _mention(tok, text, s, s + 3)  # "Par"
    with pytest.raises(SpanError, match="cuts the token"):
        _mention(tok, text, s + 2, s + 5)  # "ris"
    with pytest.raises(SpanError, match="only whitespace"):
        _mention(tok, text, 3, 4)
    with pytest.raises(SpanError, match="not a non-empty span"):
        _mention(tok, text, 5, 5)
    with pytest.raises(SpanError, match="not a non-empty span"):
        _mention(tok, text, 0, len(text) + 1)


def test_build_sequence_inserts_pseudo_token_before_the_mention(tok):
    vocab = KGVocab.from_triples([("Paris", "in", "France")])
    text = "The city of Paris, café Zoé."
    s = text.index("Paris")
    seq = build_sequence(tok, text, [Link(s, s + 5, "Paris")], vocab, separator=" /")
    (pos, entity), = seq.slots
    assert entity == vocab.entity_id("Paris")
    first, last = seq.mentions[0]
    assert tok.decode(seq.ids[pos + 1:last]) == " / Paris"  # "[E] / Paris"
    assert tok.decode(seq.ids[1:pos] + seq.ids[pos + 1:]) == "The city of / Paris, café Zoé."
    # causal masked-mention targets: the mention's tokens, each predicted from the position before
    assert [t for t in seq.targets if t != IGNORE_INDEX] == seq.ids[first:last]
    assert seq.targets[first - 1] == seq.ids[first]
    plain = build_sequence(tok, text, [Link(s, s + 5, "Paris")], vocab, inject=False)
    assert plain.slots == [] and tok.decode(plain.ids[1:]) == text


def test_loss_spans_put_the_targets_on_the_fact_after_the_injection(tok):
    vocab = KGVocab.from_triples([("Tamiku", "in", "Paris")])
    text = "Tamiku went home. The city of Paris, café."
    s = text.index("Paris")
    for bos in (True, False):
        seq = build_sequence(tok, text, [Link(0, 6, "Tamiku")], vocab, separator=" /", bos=bos,
                             loss_spans=[(s, s + 5)])
        (slot, _), = seq.slots
        assert slot == int(bos)
        predicted = [seq.ids[p + 1] for p, t in enumerate(seq.targets) if t != IGNORE_INDEX]
        assert tok.decode(predicted) == " Paris"  # the tokens of the span, wherever they moved
        assert [t for t in seq.targets if t != IGNORE_INDEX] == predicted
    # two spans, one before the injected mention: each keeps its own tokens
    s2 = text.index("city")
    seq = build_sequence(tok, text, [Link(s, s + 5, "Paris")], vocab, loss_spans=[(0, 6), (s2, s2 + 4)])
    assert tok.decode([t for t in seq.targets if t != IGNORE_INDEX]) == "Tamiku city"


def test_name_linker_links_whole_words_only():
    linker = NameLinker(["Tam", "Tamiku"])
    links = linker("Tamiku met Tam and Tamikus.")
    assert [(l.start, l.end, l.entity) for l in links] == [(0, 6, "Tamiku"), (11, 14, "Tam")]


# --- injection, map-tuning, scoring -------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tok):
    torch.manual_seed(0)
    # a larger init than training uses, so that the random model responds to its inputs
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                            init_std=0.2))
    triples = [("Paris", "in", "France"), ("Zoé", "in", "France"), ("Tamiku", "in", "Lumera")]
    vocab = KGVocab.from_triples(triples)
    kg, _ = train_transe(vocab.encode(triples), len(vocab.entities), len(vocab.relations),
                         TransEConfig(dim=8, epochs=5))
    return model, vocab, KnowledgeEmbeddings.from_transe(kg, vocab)


def test_map_tuning_trains_only_the_mapper(tok, setup):
    model, vocab, knowledge = setup
    texts = [("Paris is in France.", "Paris"), ("Tamiku went home.", "Tamiku"),
             ("Zoé went home.", "Zoé")]
    seqs = [build_sequence(tok, t, [Link(0, len(n), n)], vocab) for t, n in texts]
    plugin = KnowledgePlugin(knowledge, 32)
    before_model = weights_digest(model)
    before_mapper = {k: v.clone() for k, v in plugin.mapper.state_dict().items()}
    model.train()
    start = evaluate_loss(model, plugin, seqs)
    history = tune_mapper(model, plugin, seqs, MapperConfig(steps=100, batch_size=3, lr=0.1))
    assert weights_digest(model) == before_model  # bit-identical
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored
    assert not torch.equal(plugin.mapper.proj.weight, before_mapper["proj.weight"])
    assert evaluate_loss(model, plugin, seqs) < start - 0.3
    assert history[-1] < history[0]


def test_map_tuning_dropout_is_live_during_tuning_and_restored_after(tok, setup):
    model, vocab, knowledge = setup
    seqs = [build_sequence(tok, "Paris is in France.", [Link(0, 5, "Paris")], vocab)]
    plugin = KnowledgePlugin(knowledge, 32)
    model.eval()
    digest = weights_digest(model)
    with frozen(model, 0.25):
        assert model.training and model.config.dropout == 0.25
        assert all(m.p == 0.25 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        with torch.no_grad():
            a, b = (sequence_loss(model, plugin, seqs).item() for _ in range(2))
        assert a != b  # dropout draws new masks
    assert not model.training and model.config.dropout == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    with frozen(model, 0.0):  # no dropout: eval mode, deterministic
        assert not model.training
    tune_mapper(model, plugin, seqs, MapperConfig(steps=3, batch_size=1, dropout=0.25))
    assert weights_digest(model) == digest and model.config.dropout == 0.0 and not model.training


def test_injection_changes_only_positions_from_the_slot_on(tok, setup):
    model, vocab, knowledge = setup
    plugin = KnowledgePlugin(knowledge, 32)
    seq = build_sequence(tok, "The city of Paris, café.", [Link(12, 17, "Paris")], vocab)
    (pos, _), = seq.slots
    other = KnowledgePlugin(knowledge, 32)
    with torch.no_grad():
        other.mapper.proj.bias.fill_(1.0)
    cont = [tok.encode_ordinary(" café")]
    a = plugin_continuation_logprobs(model, plugin, [seq], cont)[0]
    b = plugin_continuation_logprobs(model, other, [seq], cont)[0]
    assert not torch.allclose(a, b)  # the injected vector reaches the continuation
    # a context cut before the slot does not see it: same scores with either plugin
    cut = type(seq)(seq.ids[:pos], [])
    x = tok.encode_ordinary(" city")
    assert torch.equal(plugin_continuation_logprobs(model, plugin, [cut], [x])[0],
                       plugin_continuation_logprobs(model, other, [cut], [x])[0])


def test_plugin_scoring_and_generation_without_slots_equal_the_id_path(tok, setup):
    model, vocab, _ = setup
    contexts = [tok.encode_ordinary("Paris is"), tok.encode_ordinary("Tamiku went home. The")]
    conts = [tok.encode_ordinary(" in France."), tok.encode_ordinary(" city")]
    ref = continuation_logprobs(model, contexts, conts)
    seqs = [build_sequence(tok, "", [], vocab, bos=False) for _ in contexts]
    for s, c in zip(seqs, contexts):
        s.ids = c
    got = plugin_continuation_logprobs(model, None, seqs, conts)
    for r, g in zip(ref, got):
        assert torch.allclose(r, g, atol=1e-5)
    new = plugin_generate_ids(model, None, seqs[1], max_new_tokens=6)
    assert new == generate_ids(model, [contexts[1]], 6, temperature=0)[0]


def test_plugin_lm_generation_continues_the_injected_prompt(tok, setup):
    model, vocab, knowledge = setup
    plugin = KnowledgePlugin(knowledge, 32)
    lm = PluginLM(model, tok, plugin, NameLinker(["Paris"]), vocab)
    prompt = "The city of Paris"
    ctx = build_sequence(tok, prompt, [Link(12, 17, "Paris")], vocab, bos=False)
    expected = tok.decode(plugin_generate_ids(model, plugin, ctx, 5, eos_id=tok.eot_id))
    assert lm.generate([prompt], max_new_tokens=5) == [expected]
    (score, n), = lm.score([prompt], [" is"])
    assert n == 1 and math.isclose(
        score, float(plugin_continuation_logprobs(model, plugin, [ctx], [tok.encode_ordinary(" is")])[0].sum()),
        rel_tol=1e-6)


# --- the evidence script at a tiny size -------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("kp_script", ROOT / "scripts/knowledge_plugin.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_fine_tuning_keeps_the_first_best_validation_step():
    script = _script()
    model = torch.nn.Linear(1, 1)
    accuracies = iter([0.5, 0.8, 0.8, 0.6])
    keeper = script.KeepBest(1, lambda m: (next(accuracies), 1.0))
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(step)
        keeper.consider(model, step)
    assert keeper.best_step == 2 and keeper.best[0] == 0.8
    assert float(keeper.state["weight"]) == 2.0  # the weights of that step, not the last ones


def test_map_tuning_corpus_states_facts_and_never_the_task_wording():
    script = _script()
    cfg = script.PluginConfig(people=40)
    world = script.make_world(cfg, random.Random(0))
    groups = world.groups
    assert sorted(n for g in groups.values() for n in g) == sorted(world.names)  # a partition
    facts = script.fact_sentences(world, groups["map"])
    relations = {text.split(" ", 1)[1].rsplit(" ", 1)[0] for text, _, _ in facts}
    assert {"is a", "lives in", "is in"} <= relations
    assert not any("work" in text for text, _, _ in facts)  # neither the task's nor pretraining's
    triples = {(h, t) for h, _, t in world.triples}
    for text, subject, obj in facts:  # the object is what the graph says about the subject
        assert text.startswith(subject) and text.endswith(f" {obj}.")
        assert (subject, obj) in triples or obj == script.DUTIES[world.profession[subject]]
    # the pretraining text only names map-tuning, plugin-validation and held-out people
    docs = script.pretraining_text(world, random.Random(0))
    for n in groups["map"] + groups["held_out"] + groups["plugin_val"]:
        for d in docs:
            if n in d.rstrip(".").split(" "):
                assert (d in {f"{n} {act}." for act in script.ACTS} or d.startswith(f"{n} met ")
                        or d.endswith((f" met {n}.", f" is a friend of {n}."))), d


def test_script_runs_at_a_tiny_size(tmp_path):
    script = _script()
    cfg = script.PluginConfig(out_dir=str(tmp_path), seeds=[0], people=40, transe_epochs=5,
                              pretrain_steps=10, finetune_steps=10, finetune_eval_every=5,
                              map_steps=5, task_map_steps=5, batch_size=8, n_embd=32, n_layer=1,
                              vocab_size=300, map_lrs=[1e-3, 1e-2], finetune_lrs=[1e-3],
                              task_lrs=[1e-3], threads=torch.get_num_threads())
    run = script.main(cfg)[0]
    assert run["base_same"] and run["tuned_same"]
    assert set(run["facts"]) == {"no plugin", "plugin", "shuffled entity vectors"}
    assert all(math.isfinite(v) and v > 0 for v in run["facts"].values())
    assert all(0 <= a <= 1 and 0 <= b <= 1 for a, b in run["task"].values())
    assert run["chosen"]["map_lr"] in (1e-3, 1e-2) and run["chosen"]["finetune_step"] in (0, 5, 10)
    table = (tmp_path / "table.txt").read_text()
    assert "chosen on validation" in table and "bit-identical" in table
    assert read_triples(tmp_path / "seed0" / "kg.tsv")  # the graph it learned from is a valid file


def test_script_user_errors_are_one_line(tmp_path):
    script = _script()
    for bad in ({"held_out": 1.5}, {"map_lrs": [-1.0]}, {"map_dropout": 1.0}, {"people": 5},
                {"held_out": 0.5, "map_people": 0.4}, {"task_template": "where does it work?"}):
        with pytest.raises(UserError):
            script.main(script.PluginConfig(out_dir=str(tmp_path), **bad))
