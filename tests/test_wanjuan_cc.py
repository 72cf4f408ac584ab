import gzip
import io
import json
import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minillm.corpus import stdlib_docstrings
from minillm.methods.wanjuan_cc import Pipeline, PipelineConfig, run
from minillm.methods.wanjuan_cc import rules
from minillm.methods.wanjuan_cc.extract import decode_html, extract_text
from minillm.methods.wanjuan_cc.language import LanguageFilter, identify
from minillm.minhash import (MinHasher, candidate_probability, exact_jaccard,
                             jaccard_estimate, lsh_params)
from minillm.methods.wanjuan_cc.quality import HashedNgramClassifier
from minillm.methods.wanjuan_cc.safety import SafetyFilter, domain_blocked, mask_pii

PROSE = ("The committee met on Tuesday to discuss the new library building. Members agreed that the "
         "reading rooms should stay open in the evening, and that the collection of local history "
         "would move to the second floor. The budget was approved after a long debate about the cost "
         "of heating, which had risen sharply over the winter. A public meeting will be held next "
         "month so that residents can see the plans and ask questions of the architects who designed "
         "the building and of the staff who will work in it.")


PROSE2 = ("Our café on the corner of the market square opened its doors in the spring of that year. "
          "The owners had moved from the coast, and they brought with them a love of strong coffee "
          "and fresh bread. Every morning the queue stretched past the bakery next door, and by noon "
          "most of the pastries were gone. In the evenings the tables were moved aside so that local "
          "musicians could play, and on Sundays the place was full of families who came to read the "
          "papers and to talk about the week that had passed.")


@pytest.fixture(scope="module")
def long_docs():
    """Long standard-library docstrings, none a near-copy of another (the library repeats some)."""
    docs = []
    for d in stdlib_docstrings():
        if len(d.split()) >= 120 and all(exact_jaccard(d, other) < 0.5 for other in docs):
            docs.append(d)
            if len(docs) == 160:
                return docs
    return docs


# --- extraction --------------------------------------------------------------------------------------

def test_extract_keeps_main_text_and_drops_chrome():
    html = """<html><head><title>A &amp; B</title><style>p {color: red}</style>
    <script>var x = "<p>not text</p>";</script></head><body>
    <nav><a href="/">Home</a> | <a href="/about">About</a></nav>
    <h1>Heading</h1><p>First   paragraph with &eacute;ntities &lt;kept&gt;.</p>
    <div>Second<br>line</div><ul><li>item one</li><li>item two</li></ul>
    <footer>Copyright notice</footer></body></html>"""
    text, title = extract_text(html)
    assert title == "A & B"
    assert text.split("\n") == ["Heading", "First paragraph with éntities <kept>.", "Second", "line",
                                "item one", "item two"]


def test_charset_from_header_and_meta():
    latin = '<meta charset="iso-8859-1"><p>café</p>'.encode("latin-1")
    assert "café" in decode_html(latin)
    assert "café" in decode_html("<p>café</p>".encode("latin-1"), "text/html; charset=ISO-8859-1")
    assert "café" in decode_html("<p>café</p>".encode("utf-8"))  # unlabelled UTF-8


@given(st.binary(max_size=3000))
def test_no_input_crashes_any_stage(raw):
    text, _ = extract_text(raw)
    text2, _ = extract_text(raw.decode("latin-1"))
    for t in (text, text2, raw.decode("utf-8", "replace")):
        identify(t)
        rules.RuleSet().check(t)
        record = {"text": t, "url": "http://x.example/" + t[:20]}
        SafetyFilter({"bad.example"}, {"spam": 1.0})(record)
    assert extract_text("<p>" * 5000 + "x" * 100_000)[0].endswith("x")  # deep, huge line


# --- language ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,lang", [
    (PROSE, "en"),
    ("Der Ausschuss hat sich am Dienstag getroffen, um die neue Bibliothek zu besprechen. Die "
     "Mitglieder waren sich einig, dass die Lesesäle am Abend geöffnet bleiben sollen und dass die "
     "Sammlung in den zweiten Stock zieht.", "de"),
    ("Le comité s'est réuni mardi pour discuter de la nouvelle bibliothèque. Les membres ont "
     "convenu que les salles de lecture resteraient ouvertes le soir et que la collection serait "
     "déplacée au deuxième étage.", "fr"),
    ("委员会周二开会讨论新图书馆的建设。成员们同意阅览室晚上继续开放。", "cjk"),
    ("Комитет собрался во вторник, чтобы обсудить новую библиотеку.", "cyrillic"),
])
def test_language_identification(text, lang):
    assert identify(text)[0] == lang


def test_language_filter_records_and_rejects():
    record = {"text": PROSE}
    assert LanguageFilter()(record) is None and record["language"] == "en"
    assert LanguageFilter(keep=("de",))({"text": PROSE}) == "language:en"
    custom = LanguageFilter(identifier=lambda t: ("en", 0.1))
    assert custom({"text": PROSE}) == "language:low_confidence"


# --- rules -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,bad", [
    (rules.word_count, "too short to be a document"),
    (rules.mean_word_length, " ".join(["supercalifragilistic"] * 60)),
    (rules.symbol_to_word_ratio, PROSE + " #tag" * 20),
    (rules.bullet_lines, "\n".join(f"• item number {i}" for i in range(30))),
    (rules.ellipsis_lines, "\n".join(f"and then the story goes on {i}..." for i in range(30))),
    (rules.alphabetic_words, PROSE + " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20" * 2),
    (rules.stop_words, " ".join(["apple", "banana", "cherry", "date"] * 20)),
    (rules.lorem_ipsum, PROSE + " Lorem ipsum dolor sit amet."),
    (rules.duplicate_lines, "\n".join(["Buy our product today."] * 10 + [PROSE])),
    (rules.duplicate_paragraphs, "\n\n".join([PROSE[:200]] * 4 + [PROSE])),
    (rules.repeated_ngrams, PROSE + " the best price the best price the best price" * 10),
])
def test_each_rule_keeps_prose_and_rejects_its_case(rule, bad):
    assert rule(PROSE) is None
    assert rule(bad) is not None


def test_boilerplate_lines_are_cleaned_and_ruleset_reports_first_failure():
    text = "Please enable JavaScript to view this page.\n" + PROSE + "\nWe use cookies. Accept all"
    record = {"text": text}
    assert rules.RuleSet().apply(record) is None
    assert record["text"] == PROSE and record["boilerplate_lines_removed"] == 2
    assert rules.RuleSet(min_words=500).check(PROSE) == "word_count:low"


# --- safety ------------------------------------------------------------------------------------------

def test_pii_masking_counts():
    text, counts = mask_pii("Mail jane.doe@example.com or call +1 415-555-0132; server 192.168.1.20.")
    assert text == "Mail <EMAIL> or call <PHONE>; server <IP>."
    assert counts == {"email": 1, "phone": 1, "ip": 1}


def test_blocklists_and_scores():
    assert domain_blocked("https://www.bad.example/page", {"bad.example"})
    assert not domain_blocked("https://notbad.example/page", {"bad.example"})
    f = SafetyFilter({"bad.example"}, {"casino": 1.0})
    assert f({"text": PROSE, "url": "http://sub.bad.example/x"}) == "safety:blocked_domain"
    assert f({"text": PROSE + " casino casino", "url": ""}) == "safety:blocked_keywords"
    clean, rude = {"text": PROSE}, {"text": PROSE + " you idiot, you stupid moron"}
    assert f(clean) is None and f(rude) is None
    assert clean["toxic_score"] == 0 and rude["toxic_score"] > 0.5
    assert clean["porn_score"] == 0


# --- quality -----------------------------------------------------------------------------------------

def test_quality_classifier_separates_ads_from_prose(long_docs):
    rng = random.Random(0)
    items = ["shoes", "phones", "watches", "laptops", "bags", "vitamins"]
    ads = [" ".join(rng.choice([f"Buy {rng.choice(items)} now!", f"{rng.randint(10, 90)}% off",
                                "Free shipping on all orders.", "Limited offer, click here.",
                                f"Only ${rng.randint(5, 500)}.99", "Best deals of the year!",
                                "Order today and save big."]) for _ in range(rng.randint(8, 20)))
           for _ in range(200)]
    prose = [d[:600] for d in long_docs[:150]] + [d[600:1200] for d in long_docs[:50]]
    texts, labels = ads + prose, [0] * len(ads) + [1] * len(prose)  # 1 = not an ad
    order = list(range(len(texts)))
    rng.shuffle(order)
    train, test = order[:300], order[300:]
    clf = HashedNgramClassifier(buckets=2**16).fit([texts[i] for i in train], [labels[i] for i in train])
    p = clf.predict_proba([texts[i] for i in test])
    accuracy = ((p > 0.5).long().tolist() == np.array([labels[i] for i in test])).mean()
    assert accuracy >= 0.95


# --- minhash ------------------------------------------------------------------------------------------

def edit(text: str, every: int, rng: random.Random) -> str:
    words = text.split()
    for i in range(0, len(words), every):
        words[min(i + rng.randrange(every), len(words) - 1)] = rng.choice(["alpha", "omega", "delta"])
    return " ".join(words)


def test_minhash_estimates_jaccard(long_docs):
    rng = random.Random(1)
    hasher = MinHasher()
    errors = []
    for doc in long_docs[:120]:
        other = edit(doc, rng.choice([5, 10, 20, 40]), rng)
        sig = hasher.signatures([doc, other])
        j = exact_jaccard(doc, other)
        err = abs(jaccard_estimate(sig[0], sig[1]) - j)
        assert err <= 4 * max(np.sqrt(j * (1 - j) / 128), 0.01)  # within 4 standard deviations
        errors.append(err)
    assert np.mean(errors) <= 0.05
    single = np.stack([hasher.signatures([d])[0] for d in long_docs[:20]])
    assert np.array_equal(single, hasher.signatures(long_docs[:20]))  # batching changes nothing


def test_lsh_parameters_catch_pairs_at_the_verification_threshold():
    bands, rows = lsh_params(128, 0.7)
    assert bands * rows <= 128
    assert candidate_probability(0.7, bands, rows) >= 0.99
    assert candidate_probability(0.7, 128 // (rows + 1), rows + 1) < 0.99  # rows is the largest


# --- the pipeline ------------------------------------------------------------------------------------

def write_jsonl(path, records):
    with gzip.open(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, long_docs):
    """Four JSONL shards of real text; near-copies of some documents live in other shards."""
    rng = random.Random(2)
    folder = tmp_path_factory.mktemp("inputs")
    originals = long_docs[:120]
    shards = [[] for _ in range(4)]
    for i, doc in enumerate(originals):
        shards[i % 4].append({"id": f"doc{i}", "text": doc})
    clusters = []
    for i in range(0, 120, 3):  # every third document gets one or two near-copies elsewhere
        copies = []
        for c in range(1 + i % 2):
            text = edit(originals[i], rng.choice([40, 60, 80]), rng)
            copy_id = f"doc{i}-copy{c}"
            shards[(i + 1 + c) % 4].append({"id": copy_id, "text": text})
            copies.append((copy_id, exact_jaccard(originals[i], text)))
        clusters.append((f"doc{i}", copies))
    shards[0].append({"id": "exact", "text": originals[5]})  # an exact copy
    for k, records in enumerate(shards):
        write_jsonl(folder / f"part{k}.jsonl.gz", records)
    return folder, clusters


def final_records(out_dir):
    out = []
    for path in sorted((out_dir / "final").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            out.extend(json.loads(line) for line in f)
    return out


def run_ranks(cfg: PipelineConfig, world: int):
    pipeline = Pipeline(cfg)
    for stage in ("filter", "pairs", "clusters", "finish"):
        for rank in range(world):  # each rank's share; stages meet through files
            pipeline.run_stage(stage, rank, world)
    return pipeline.report()


def test_dedup_across_ranks_finds_planted_clusters(tmp_path, planted):
    folder, clusters = planted
    report = run_ranks(PipelineConfig(inputs=[str(folder)], out_dir=str(tmp_path)), world=2)
    kept = {r["id"] for r in final_records(tmp_path)}
    filtered = {r["id"] for p in (tmp_path / "filter").glob("*.jsonl.gz")
                for r in map(json.loads, gzip.open(p, "rt"))}
    found = total = 0
    for original, copies in clusters:
        members = [original] + [c for c, j in copies if j >= 0.8]
        members = [m for m in members if m in filtered]  # both survived the rule stage
        if len(members) < 2:
            continue
        total += 1
        found += sum(m in kept for m in members) == 1
    assert total >= 20 and found / total >= 0.95
    originals = {f"doc{i}" for i in range(120)} & filtered
    unrelated = {f"doc{i}" for i in range(1, 120, 3)} & originals  # no copies planted
    assert unrelated <= kept  # no unrelated document removed
    assert "exact" not in kept or "doc5" not in kept
    assert report["duplicates"]["removed"] >= found


def test_two_ranks_equal_one_rank_and_a_crash_loses_nothing(tmp_path, planted, monkeypatch):
    folder, _ = planted
    one = run_ranks(PipelineConfig(inputs=[str(folder)], out_dir=str(tmp_path / "one")), world=1)
    two = run_ranks(PipelineConfig(inputs=[str(folder)], out_dir=str(tmp_path / "two")), world=2)
    assert one == two
    files = lambda d: {p.name: p.read_bytes() for p in sorted((d / "final").glob("*.jsonl.gz"))}  # noqa: E731
    assert files(tmp_path / "one") == files(tmp_path / "two")

    original = Pipeline.finish_shard
    calls = []

    def crash_on_shard_2(self, index):
        calls.append(index)
        if index == 2 and calls.count(2) == 1:
            (self.out / "final").mkdir(exist_ok=True)
            (self.out / "final" / "00002.jsonl.gz.tmp").write_bytes(b"half written")
            raise KeyboardInterrupt("killed mid-shard")
        return original(self, index)

    monkeypatch.setattr(Pipeline, "finish_shard", crash_on_shard_2)
    cfg = PipelineConfig(inputs=[str(folder)], out_dir=str(tmp_path / "crash"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert run(cfg) == one  # the rerun skips finished shards and redoes shard 2
    assert files(tmp_path / "crash") == files(tmp_path / "one")
    assert calls.count(0) == 1 and calls.count(2) == 2


def test_warc_input_to_token_shards(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from minillm.data import TokenDataset
    from minillm.tokenizer import train_bpe

    pages = {"https://news.example/a": ("utf-8", f"<html><head><title>News</title></head><body>"
                                                 f"<nav>Home</nav><p>{PROSE}</p></body></html>"),
             "https://shop.example/b": ("latin-1", f"<p>{PROSE2}</p>"),
             "https://de.example/c": ("utf-8", "<p>Der Ausschuss hat sich getroffen und die "
                                               "Mitglieder waren sich einig, dass es so ist.</p>")}
    with open(tmp_path / "crawl.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, (charset, html) in pages.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", f"text/html; charset={charset}")],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=io.BytesIO(html.encode(charset)), http_headers=headers))
    tok = train_bpe([PROSE] * 3, vocab_size=300)
    tok.save(tmp_path / "tok.json")
    report = run(PipelineConfig(inputs=[str(tmp_path / "crawl.warc.gz")], out_dir=str(tmp_path / "out"),
                                tokenizer=str(tmp_path / "tok.json")))
    records = final_records(tmp_path / "out")
    assert [r["url"] for r in records] == ["https://news.example/a", "https://shop.example/b"]
    assert records[0]["title"] == "News" and records[0]["domain"] == "news.example"
    assert "café" in records[1]["text"] and "Home" not in records[0]["text"]
    assert set(records[0]) >= {"toxic_score", "porn_score", "fluency_score", "not_ad_score"}
    assert report["rejected"] == {"language:de": 1}
    data = TokenDataset(tmp_path / "out" / "tokens")
    assert tok.decode(np.concatenate([np.asarray(s) for s in data.shards]).tolist()).count("<|endoftext|>") == 2


def test_resiliparse_backend_agrees_on_main_text():
    pytest.importorskip("resiliparse")
    html = (f"<html><head><title>News</title></head><body><nav>Home | About</nav><p>{PROSE}</p>"
            f"<p>{PROSE2}</p><footer>Copyright</footer></body></html>")
    fast, title = extract_text(html, backend="resiliparse")
    ours, our_title = extract_text(html)
    assert title == our_title == "News"
    assert "Home" not in fast and "Copyright" not in fast
    assert [line for line in fast.split("\n") if line] == ours.split("\n")
