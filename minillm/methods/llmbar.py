"""LLMBar: meta-evaluating LLM evaluators on instruction following (Zeng et al. 2023,
"Evaluating Large Language Models at Evaluating Instruction Following").

An evaluator sees an instruction and two outputs, one of which follows the instruction while the
other does not (and may look better: longer, more engaging), and names the better one.

- Data: the released format is one JSON list per subset of `{input, output_1, output_2, label}`
  (label 1 or 2 names the output that follows the instruction), in `Natural/dataset.json` and
  `Adversarial/{Neighbor,GPTInst,GPTOut,Manual}/dataset.json` of the paper's repository
  (`Dataset/LLMBar/`). `load_folder` reads every `dataset.json` below a folder; a malformed file
  is a `UserError` naming the file, the item and the field. `constructed_set()` builds a small
  offline set in the same format (see its docstring). `recorded_evaluator` replays the verdicts
  the paper's evaluators recorded in the same repository.
- Protocol (`meta_evaluate`), as the authors' `evaluate.py` computes it: every pair is judged in
  both orders. Accuracy = correct verdicts / (2 N); positional agreement = share of pairs whose
  two verdicts pick the same output. A tie (an unparseable answer, or equal scores) is never
  correct, and two ties agree with each other, as in the authors' code; ties are counted and
  reported. Each subset is reported, in the paper's order, and the Adversarial subsets are
  averaged without weights, as the paper's tables do ("Adversarial (mean)").
- Strategies (`Strategy`), named and composed as in the paper, with prompts of our own. Vanilla
  asks which output is better; "*" adds the Rules (carry out the instruction precisely, no more
  and no less than it asks, and let neither order nor length sway the choice), so the authors'
  `Vanilla` prompt is the paper's Vanilla* and their `Vanilla_NoRules` its Vanilla. CoT asks for
  an explanation before the verdict; Metrics first has the evaluator write up to 3 questions
  specific to the instruction, shown in the comparison prompt; Reference first has it write its
  own output, shown as a reference; Swap judges with CoT in both orders and, where both orders
  gave a verdict and they conflict, asks a second prompt that shows the two explanations, each
  labelled for the output it favours; Swap+CoT has that second prompt explain first too. The
  paper's tables use Vanilla, Vanilla*, CoT*, Swap*, Swap+CoT*, Metrics*, Reference* and
  Metrics+Reference* (`PAPER_STRATEGIES`); `Strategy.parse` reads those names or components
  joined by "+" ("rules+metrics+reference").
- An evaluator is any callable from (instruction, output (a), output (b)) triples to verdicts "a",
  "b" or None. `LMEvaluator` makes one from any `LanguageModel`: `verdict_by="score"` compares the
  log-likelihoods of " Output (a)" and " Output (b)" after the prompt (and after the explanation
  it generated, for CoT and Swap) (a local model); `verdict_by="text"` generates and parses the
  answer (an HTTP model).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..generate import LanguageModel

PAPER_SUBSETS = ("Natural", "Adversarial/Neighbor", "Adversarial/GPTInst", "Adversarial/GPTOut",
                 "Adversarial/Manual")

Triple = tuple[str, str, str]  # (instruction, output (a), output (b))
Evaluator = Callable[[list[Triple]], list[str | None]]


@dataclass(frozen=True)
class Pair:
    input: str
    output_1: str
    output_2: str
    label: int  # 1 or 2: the output that follows the instruction

    def to_json(self) -> dict:
        return {"input": self.input, "output_1": self.output_1, "output_2": self.output_2,
                "label": self.label}


# --- the protocol --------------------------------------------------------------------------------

def _summary(correct: int, agree: int, ties: int, n: int) -> dict:
    return {"n": n, "accuracy": correct / (2 * n), "agreement": agree / n, "ties": ties}


def meta_evaluate(subsets: dict[str, list[Pair]], evaluator: Evaluator) -> dict:
    """Judge every pair in both orders (one call of `evaluator` for everything) and report, per
    subset, accuracy, positional agreement and ties (verdicts that were None), plus the unweighted
    mean of the Adversarial subsets. `verdicts[name][i]` is (order 1, order 2), order 1 showing
    output_1 as (a)."""
    triples = []
    for pairs in subsets.values():
        for p in pairs:
            triples += [(p.input, p.output_1, p.output_2), (p.input, p.output_2, p.output_1)]
    verdicts = evaluator(triples)
    if len(verdicts) != len(triples) or any(v not in ("a", "b", None) for v in verdicts):
        raise ValueError("an evaluator returns one of 'a', 'b', None per triple")
    report, all_verdicts, k = {}, {}, 0
    for name, pairs in subsets.items():
        correct = agree = ties = 0
        all_verdicts[name] = []
        for p in pairs:
            v1, v2 = verdicts[k], verdicts[k + 1]
            k += 2
            pick1 = {"a": 1, "b": 2}.get(v1)  # output_1 was shown as (a)
            pick2 = {"a": 2, "b": 1}.get(v2)  # output_2 was shown as (a)
            correct += (pick1 == p.label) + (pick2 == p.label)
            agree += pick1 == pick2  # two ties agree, as the authors' evaluate.py counts them
            ties += (v1 is None) + (v2 is None)
            all_verdicts[name].append((v1, v2))
        report[name] = _summary(correct, agree, ties, len(pairs))
    adversarial = [r for name, r in report.items() if name.startswith("Adversarial/")]
    if len(adversarial) > 1:
        report["Adversarial (mean)"] = {
            "n": sum(r["n"] for r in adversarial),
            "accuracy": sum(r["accuracy"] for r in adversarial) / len(adversarial),
            "agreement": sum(r["agreement"] for r in adversarial) / len(adversarial),
            "ties": sum(r["ties"] for r in adversarial)}
    return {"subsets": report, "verdicts": all_verdicts}


def format_report(report: dict) -> str:
    rows = [f"{'subset':<26} {'pairs':>5} {'accuracy':>9} {'agreement':>10} {'ties':>5}"]
    for name, r in report["subsets"].items():
        rows.append(f"{name:<26} {r['n']:>5} {100 * r['accuracy']:>8.1f}% "
                    f"{100 * r['agreement']:>9.1f}% {r['ties']:>5}")
    return "\n".join(rows)


# --- strategies and LM evaluators ----------------------------------------------------------------

@dataclass(frozen=True)
class Strategy:
    """A prompting strategy, composed as the paper composes them: `rules` adds the Rules to every
    judging prompt (the paper marks it "*"); `cot` asks for an explanation before the verdict;
    `metrics` / `reference` first generate questions / a reference output for the instruction;
    `swap` judges with CoT in both orders and sends a disagreement to a second prompt that reads
    both explanations (with `cot`, that prompt explains before its verdict too: "Swap+CoT")."""
    rules: bool = False
    cot: bool = False
    metrics: bool = False
    reference: bool = False
    swap: bool = False

    @classmethod
    def parse(cls, text: str) -> Strategy:
        """A paper name ("Vanilla", "Vanilla*", "CoT*", "Swap*", "Swap+CoT*", "Metrics*",
        "Reference*", "Metrics+Reference*"; "*" adds the Rules) or components joined by "+"
        ("rules+metrics+reference"), in any case."""
        lowered = text.strip().lower()
        rules = lowered.endswith("*")
        parts = [p.strip() for p in lowered.removesuffix("*").split("+") if p.strip()]
        vanilla = parts == ["vanilla"]
        parts = [] if vanilla else parts
        known = ("rules", "cot", "metrics", "reference", "swap")
        if not (parts or vanilla) or any(p not in known for p in parts):
            raise UserError(f"strategy {text!r}: expected a paper name (Vanilla, Vanilla*, CoT*, "
                            "Swap*, Swap+CoT*, Metrics*, Reference*, Metrics+Reference*) or parts "
                            "joined by '+' from rules, cot, metrics, reference, swap")
        return cls(**{p: True for p in parts}, **({"rules": True} if rules else {}))

    @property
    def name(self) -> str:
        """The paper's name: "Vanilla" or the parts joined by "+", and "*" when the Rules are in."""
        parts = [label for on, label in ((self.swap, "Swap"), (self.cot, "CoT"),
                                         (self.metrics, "Metrics"), (self.reference, "Reference"))
                 if on]
        return ("+".join(parts) or "Vanilla") + ("*" if self.rules else "")


# The strategies of the paper's tables ("*": with the Rules)
PAPER_STRATEGIES = ("Vanilla", "Vanilla*", "CoT*", "Swap*", "Swap+CoT*", "Metrics*", "Reference*",
                    "Metrics+Reference*")

RULES = """Rules:
1. First decide whether each output carries out the instruction precisely.
2. The better output does what the instruction asks, no more and no less: extra detail, a friendly
tone or polish never make up for a missed or broken requirement.
3. Let neither the order in which the outputs appear nor their length sway you."""

ASK_VERDICT = 'Answer with one line: "Verdict: Output (a)" or "Verdict: Output (b)".\n'
ASK_EXPLAINED_VERDICT = ("First explain briefly which output follows the instruction better, then "
                         'end with one line: "Verdict: Output (a)" or "Verdict: Output (b)".\n')

VERDICT_RE = re.compile(r"verdict\s*:?\s*\**\s*output\s*\(?\s*([ab])\s*\)", re.IGNORECASE)
MENTION_RE = re.compile(r"output\s*\(\s*([ab])\s*\)", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """"a" or "b" from an evaluator's answer: the last "Verdict: Output (x)", else the one output
    named if only one is; None (a tie) otherwise."""
    found = VERDICT_RE.findall(text)
    if found:
        return found[-1].lower()
    named = {x.lower() for x in MENTION_RE.findall(text)}
    return named.pop() if len(named) == 1 else None


def swap_labels(text: str) -> str:
    """An explanation written about the other order, relabelled for this one: "Output (a)" and
    "Output (b)" trade places."""
    def swap(m: re.Match) -> str:
        start, end = m.start(1) - m.start(), m.end(1) - m.start()
        return m.group(0)[:start] + {"a": "b", "b": "a", "A": "B", "B": "A"}[m.group(1)] + \
            m.group(0)[end:]
    return MENTION_RE.sub(swap, text)


class LMEvaluator:
    """An `Evaluator` from a `LanguageModel` and a `Strategy`. `verdict_by`: "score" (compare the
    log-likelihoods of " Output (a)" and " Output (b)" after the prompt, and after the generated
    explanation where the strategy asks for one) or "text" (generate and parse). `max_new_tokens`
    bounds every generation (explanations, questions, references). After a call, `stats` holds
    the numbers of generate calls, scored verdicts, unparsed answers, generated tokens and Swap's
    second decisions."""

    def __init__(self, lm: LanguageModel, strategy: Strategy | str = "Vanilla",
                 verdict_by: str = "score", max_new_tokens: int = 256):
        if verdict_by not in ("score", "text"):
            raise UserError(f"verdict_by {verdict_by!r}: expected 'score' or 'text'")
        self.lm, self.verdict_by, self.max_new_tokens = lm, verdict_by, max_new_tokens
        self.strategy = Strategy.parse(strategy) if isinstance(strategy, str) else strategy
        self.stats = {"generations": 0, "scored": 0, "unparsed": 0, "completion_tokens": 0,
                      "swap_decisions": 0}

    def __call__(self, triples: Sequence[Triple]) -> list[str | None]:
        triples = list(triples)
        s = self.strategy
        instructions = sorted({t[0] for t in triples})
        questions = references = {}
        if s.metrics:
            outs = self._generate([self._questions_prompt(i) for i in instructions])
            questions = {i: "\n".join([q for q in o.split("\n") if q.strip()][:3])
                         for i, o in zip(instructions, outs)}
        if s.reference:
            outs = self._generate([self._reference_prompt(i) for i in instructions])
            references = dict(zip(instructions, outs))

        def compare(t: Triple, explain: bool) -> str:
            return self._compare_prompt(t, questions.get(t[0]), references.get(t[0]), explain)
        if not s.swap:
            return self._verdicts([compare(t, s.cot) for t in triples], explain=s.cot)[0]
        # Swap: judge each distinct triple with CoT, in both orders ...
        both = list(dict.fromkeys(triples + [(i, b, a) for i, a, b in triples]))
        verdicts, explanations = self._verdicts([compare(t, True) for t in both], explain=True)
        at = {t: k for k, t in enumerate(both)}
        final: list[str | None] = []
        redo: list[tuple[int, str]] = []
        for n, (i, a, b) in enumerate(triples):
            k, r = at[(i, a, b)], at[(i, b, a)]
            mirrored = {"a": "b", "b": "a"}.get(verdicts[r])  # the other order's pick, here
            final.append(verdicts[k])
            # ... and where both orders gave a verdict and they conflict, decide again from both
            # explanations, each labelled for the output it favours (the other order's relabelled)
            if verdicts[k] is not None and mirrored is not None and verdicts[k] != mirrored:
                ours, theirs = explanations[k], swap_labels(explanations[r])
                for_a, for_b = (ours, theirs) if verdicts[k] == "a" else (theirs, ours)
                redo.append((n, self._swap_prompt((i, a, b), for_a, for_b, s.cot)))
        if redo:
            decided = self._verdicts([p for _, p in redo], explain=s.cot)[0]
            for (n, _), verdict in zip(redo, decided):
                final[n] = verdict
            self.stats["swap_decisions"] += len(redo)
        return final

    def _verdicts(self, prompts: list[str], explain: bool) -> tuple[list[str | None], list[str]]:
        """A verdict ("a", "b" or None) per prompt, and the text generated before it: the answer
        itself when verdicts are read from text; the explanation (or "") when they are scored."""
        if self.verdict_by == "text":
            answers = self._generate(prompts)
            verdicts = [parse_verdict(a) for a in answers]
            self.stats["unparsed"] += sum(v is None for v in verdicts)
            return verdicts, answers
        explanations = self._generate(prompts) if explain else [""] * len(prompts)
        contexts = [p + (e + "\n" if e else "") + "Verdict:" for p, e in zip(prompts, explanations)]
        scores = self.lm.score([c for c in contexts for _ in range(2)],
                               [" Output (a)", " Output (b)"] * len(contexts))
        self.stats["scored"] += len(scores)
        margins = [scores[2 * i][0] - scores[2 * i + 1][0] for i in range(len(contexts))]
        return ["a" if m > 0 else "b" if m < 0 else None for m in margins], explanations

    def _generate(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        outs = self.lm.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.0)
        self.stats["generations"] += len(outs)
        self.stats["completion_tokens"] += sum(getattr(o, "completion_tokens", 0) or 0
                                               for o in outs)
        return [o.strip() for o in outs]

    # prompts of our own, composed as the paper's are
    def _questions_prompt(self, instruction: str) -> str:
        return ("Write up to three short yes-or-no questions that an output must pass to follow "
                "the instruction below precisely, the most important first. One question per "
                f"line, nothing else.\n\n# Instruction\n{instruction}\n\n# Questions\n")

    def _reference_prompt(self, instruction: str) -> str:
        return f"Respond concisely.\n\n# Instruction\n{instruction}\n\n# Output\n"

    def _head(self) -> str:
        rules = RULES + "\n\n" if self.strategy.rules else ""
        return ("You are comparing two outputs written for one instruction. Choose the output that "
                "follows the instruction better.\n\n" + rules)

    def _compare_prompt(self, triple: Triple, questions: str | None, reference: str | None,
                        explain: bool) -> str:
        instruction, a, b = triple
        body = f"# Instruction\n{instruction}\n\n# Output (a)\n{a}\n\n# Output (b)\n{b}\n\n"
        if questions is not None:
            body += f"# Questions that a good output passes\n{questions}\n\n"
        if reference is not None:
            body += f"# A reference output (it may itself be imperfect)\n{reference}\n\n"
        return self._head() + body + (ASK_EXPLAINED_VERDICT if explain else ASK_VERDICT)

    def _swap_prompt(self, triple: Triple, for_a: str, for_b: str, explain: bool) -> str:
        instruction, a, b = triple
        return (self._head() + "Two judges disagree about the outputs below. Review both "
                "judgements, then decide.\n\n"
                f"# Instruction\n{instruction}\n\n# Output (a)\n{a}\n\n# Output (b)\n{b}\n\n"
                f"# The judge who prefers Output (a)\n{for_a}\n\n"
                f"# The judge who prefers Output (b)\n{for_b}\n\n"
                + (ASK_EXPLAINED_VERDICT if explain else ASK_VERDICT))


# --- data ----------------------------------------------------------------------------------------

def load_subset(path: str | Path) -> list[Pair]:
    """The pairs of one released `dataset.json`; UserError naming file, item and field."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON list of {{input, output_1, output_2, label}} "
                        f"objects, found {type(items).__name__}")
    pairs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {i} is {type(item).__name__}, expected an object")
        for name in ("input", "output_1", "output_2"):
            if not isinstance(item.get(name), str):
                raise UserError(f"{path}: item {i}: field {name!r} is missing or not a string")
        if item.get("label") not in (1, 2) or isinstance(item.get("label"), bool):
            raise UserError(f"{path}: item {i}: field 'label' is {item.get('label')!r}, expected "
                            "1 or 2")
        pairs.append(Pair(item["input"], item["output_1"], item["output_2"], item["label"]))
    if not pairs:
        raise UserError(f"{path}: no items")
    return pairs


def dataset_root(folder: str | Path) -> Path:
    """The folder that holds the subsets: `folder` itself, or the `LLMBar` folder inside the
    repository root or its `Dataset/` folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder (give the folder that holds the subsets)")
    if not folder.is_dir():
        raise UserError(f"--data {folder}: no such folder")
    for inner in (folder / "Dataset" / "LLMBar", folder / "LLMBar"):
        if inner.is_dir():
            return inner
    return folder


def load_folder(folder: str | Path) -> dict[str, list[Pair]]:
    """Subsets named by their folder relative to the dataset root (`dataset_root`: "Natural",
    "Adversarial/GPTInst"), from every `dataset.json` below it, in the paper's order (Natural,
    then Neighbor, GPTInst, GPTOut, Manual; any other subset after them, by name)."""
    folder = dataset_root(folder)
    files = sorted(p for p in folder.rglob("dataset.json") if "evaluators" not in p.parts)
    if not files:
        raise UserError(f"--data {folder}: no dataset.json below it (expected the released "
                        "LLMBar folder: Natural/dataset.json, Adversarial/*/dataset.json)")
    subsets = {(p.parent.relative_to(folder).as_posix() or "."): p for p in files}

    def paper_order(name: str) -> tuple[int, str]:
        return (PAPER_SUBSETS.index(name) if name in PAPER_SUBSETS else len(PAPER_SUBSETS), name)
    return {name: load_subset(subsets[name]) for name in sorted(subsets, key=paper_order)}


def recorded_evaluator(folder: str | Path, name: str) -> Evaluator:
    """The verdicts an evaluator of the paper recorded, replayed: `name` is one of the released
    runs ("GPT-4/Vanilla", "ChatGPT/Swap_CoT"), read from `<subset>/evaluators/<name>/result.json`
    of every subset. Each recorded item's last result holds the winner ("1", "2" or null) when
    output_1 was shown first ("swap = False") and when output_2 was ("swap = True"), both naming
    the outputs by their original number. `meta_evaluate` on them recomputes the paper's figures,
    a check of the protocol."""
    root = dataset_root(folder)
    files = sorted(root.glob(f"**/evaluators/{name}/result.json"))
    if not files:
        raise UserError(f"--replay {name}: no evaluators/{name}/result.json below {root}")
    verdicts: dict[Triple, str | None] = {}
    for path in files:
        try:
            for item in json.loads(path.read_text(encoding="utf-8")):
                last = item["results"][-1]
                first, second = last["swap = False"]["winner"], last["swap = True"]["winner"]
                verdicts[(item["input"], item["output_1"], item["output_2"])] = \
                    {"1": "a", "2": "b"}.get(first)
                verdicts[(item["input"], item["output_2"], item["output_1"])] = \
                    {"1": "b", "2": "a"}.get(second)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UserError(f"{path}: not a recorded LLMBar result ({e!r})") from None

    def replay(triples: list[Triple]) -> list[str | None]:
        missing = [t for t in triples if t not in verdicts]
        if missing:
            raise UserError(f"--replay {name}: no recorded verdict for the pair of instruction "
                            f"{missing[0][0][:60]!r}")
        return [verdicts[t] for t in triples]
    return replay


def write_folder(folder: str | Path, subsets: dict[str, list[Pair]]) -> None:
    """Write subsets in the released layout (`<name>/dataset.json`)."""
    for name, pairs in subsets.items():
        path = Path(folder) / name / "dataset.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps([p.to_json() for p in pairs], indent=1, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")


# --- the constructed offline set -----------------------------------------------------------------

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "mango", "pear", "plum", "grape"],
    "colours": ["red", "green", "blue", "yellow", "purple", "orange", "white"],
    "animals": ["horse", "rabbit", "tiger", "sheep", "eagle", "dolphin", "fox"],
    "vegetables": ["carrot", "onion", "potato", "cabbage", "pea", "leek", "bean"],
}
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"),
             ("light", "dark"), ("early", "late"), ("happy", "sad"), ("open", "closed")]
WORDS = ["river", "garden", "window", "pencil", "bridge", "candle", "mirror", "ladder"]
TRANSLATIONS = [("good morning", "bonjour", "buenos días"), ("thank you", "merci", "gracias"),
                ("cat", "chat", "gato"), ("water", "eau", "agua"), ("house", "maison", "casa"),
                ("bread", "pain", "pan"), ("friend", "ami", "amigo"), ("book", "livre", "libro")]
SENTENCES = {"the sea": "The sea is deep and blue.", "winter": "Winter nights are long.",
             "a cat": "A cat sleeps in the sun.", "the moon": "The moon lights the night.",
             "bread": "Fresh bread smells wonderful.", "rain": "Rain taps on the roof.",
             "a forest": "A forest hums with life.", "music": "Music lifts the heart."}


def _family_items(rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(instruction, output that follows it, a longer fluent output that does not, a plainly
    wrong output of similar length) for every family, one random instance each."""
    cat, other = rng.sample(sorted(CATEGORIES), 2)
    n = rng.randint(2, 4)
    items = CATEGORIES[cat][:]
    rng.shuffle(items)
    word, opposite = rng.choice(OPPOSITES)
    wrong_opposite = rng.choice([o for w, o in OPPOSITES if o != opposite])
    caps = rng.choice(WORDS)
    count = rng.randint(3, 7)
    numbers = rng.sample(range(10, 100), 3)
    topic = rng.choice(sorted(SENTENCES))
    other_topic = rng.choice([t for t in SENTENCES if t != topic])
    parity = rng.randint(10, 999)
    even = "Yes." if parity % 2 == 0 else "No."
    en, fr, es = rng.choice(TRANSLATIONS)
    up_to = ", ".join(str(i) for i in range(1, count + 1))
    return [
        (f"List exactly {n} {cat}, separated by commas.", ", ".join(items[:n]),
         f"Here are some {cat} you might enjoy: {', '.join(items[:n + 2])}. Each of these {cat} "
         "is loved around the world, and there are many more to discover.",
         ", ".join(CATEGORIES[other][:n])),
        (f"What is the opposite of '{word}'? Answer with one word.", opposite.capitalize(),
         f"The opposite of '{word}' is usually said to be '{opposite}'. Pairs like these are "
         "called antonyms, and learning them is a great way to build a richer vocabulary.",
         wrong_opposite.capitalize()),
        (f"Write the word '{caps}' in capital letters and nothing else.", caps.upper(),
         f"Sure! Here is the word '{caps}' written in capital letters: {caps.upper()}. Capital "
         "letters are often used for headings, titles and emphasis.", caps),
        (f"Count from 1 to {count}, separating the numbers with commas.", up_to,
         "Counting is one of the first skills we learn. Let us count together: "
         + ", ".join(str(i) for i in range(1, count + 4)) + ". Well done!",
         ", ".join(str(i) for i in range(count, 0, -1))),
        (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
         ", ".join(map(str, sorted(numbers))),
         f"Sorted from largest to smallest, the numbers are "
         f"{', '.join(map(str, sorted(numbers, reverse=True)))}. Sorting is a common task in "
         "mathematics and in computer science.",
         ", ".join(map(str, sorted(numbers, reverse=True)))),
        (f"Write one sentence about {topic} in fewer than eight words.", SENTENCES[topic],
         f"{SENTENCES[topic][:-1]}, and it reminds many people of quiet days, old stories and "
         "the simple pleasures of everyday life.", SENTENCES[other_topic]),
        (f"Is {parity} an even number? Answer yes or no.", even,
         "Whether a number is even depends on its last digit: numbers ending in 0, 2, 4, 6 or 8 "
         "are even, and all the others are odd. It is a useful rule to remember.",
         "No." if even == "Yes." else "Yes."),
        (f"Translate '{en}' into French. Reply with the translation only.", fr.capitalize(),
         f"In Spanish, '{en}' is '{es}'. Spanish is spoken by hundreds of millions of people, so "
         "it is a very useful language to learn.", es.capitalize()),
    ]


def constructed_set(per_family: int = 6, seed: int = 0) -> dict[str, list[Pair]]:
    """A small offline set in the released format, from 8 instruction families with checkable
    constraints (list exactly n, one word, capitals only, count to n, sort ascending, under eight
    words, yes / no, translate into French). "Natural": the other output is plainly wrong (wrong
    category, wrong order, another language) and about as long. "Adversarial/Constructed": the
    other output is fluent, on topic and always longer, but breaks the instruction (adds, omits or
    answers another question), so an evaluator that prefers length scores 0. The position of the
    right output is random."""
    rng = random.Random(seed)
    natural, adversarial = [], []
    for _ in range(per_family):
        for instruction, good, longer_bad, plain_bad in _family_items(rng):
            for subset, bad in ((natural, plain_bad), (adversarial, longer_bad)):
                label = rng.choice((1, 2))
                first, second = (good, bad) if label == 1 else (bad, good)
                subset.append(Pair(instruction, first, second, label))
    return {"Natural": natural, "Adversarial/Constructed": adversarial}


__all__ = ["PAPER_STRATEGIES", "PAPER_SUBSETS", "Evaluator", "LMEvaluator", "Pair", "Strategy",
           "constructed_set", "dataset_root", "format_report", "load_folder", "load_subset",
           "meta_evaluate", "parse_verdict", "recorded_evaluator", "swap_labels", "write_folder"]
