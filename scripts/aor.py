"""AoR against majority voting on the arithmetic task, with a minillm policy and several judges.

    python scripts/aor.py                 # the default run (its measured time: DESIGN.md, "Method: AoR")
    python scripts/aor.py --tiny          # a seconds-long smoke run (in out/aor-tiny)

1. The policy: `minillm.methods.o1.train_policy` (a tiny GPT pretrained and fine-tuned on worked
   solutions) with the settings of `scripts/o1.py`, in its folder (`--policy-dir`, default
   out/o1/policy): whichever script runs first trains it, the other loads it. `--policy FILE` uses
   any trained minillm model with its tokenizer instead.
2. `--questions` held-out problems of `--level` digits; `--max-samples` chains sampled per question
   at `--temperature`, once, cached in `--out-dir/samples.json`. Every method sees the same chains
   in the same order: voting and AoR without dynamic sampling read the first `--initial-samples`;
   dynamic sampling draws from the rest, `--extra-samples` at a time.
3. Judges: the outcome reward model of `minillm.methods.o1`, trained on the policy's samples of
   training problems of the same level (cached in `--out-dir`), at the paper's threshold and at each of
   `--orm-thresholds` (its probabilities x 10 seldom reach 6); the noisy oracle of each
   `--oracle-accuracy`; the constant judge (which must equal voting); with `--judge-url` and
   `--judge-model`, `LLMJudge` over any OpenAI-compatible server (e.g. scripts/serve.py).
4. Prints how well the ORM ranks the chains (AUC), then accuracy overall, on "minority" questions
   (the right answer is among the first `--initial-samples` chains but on fewer than half of them)
   and on "outvoted" questions (it is among them but some wrong answer has at least as many), for
   voting and for AoR with each judge, with and without dynamic sampling; then where dynamic
   sampling spends its samples, by the vote margin of the first chains. Writes `results.json` to
   `--out-dir`.
"""

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minillm.backends import OpenAIClient
from minillm.checkpoint import load_model
from minillm.cli import given_fields, parse_config
from minillm.errors import UserError, run_main
from minillm.fileio import write_json
from minillm.methods.aor import (AoRConfig, ConstantJudge, LLMJudge, NoisyOracleJudge, ORMJudge,
                                 aggregate, bucket_by_answer, majority_vote, pool_sampler)
from minillm.methods.o1 import (OutcomeRewardModel, Policy, PolicyConfig, outcome_examples,
                                sample, train_policy, train_reward_model)
from minillm.tasks import (Arithmetic, Problem, check, extract_answer, prompt,
                           split_steps)


@dataclass
class AoRScriptConfig:
    out_dir: str = "out/aor"
    policy_dir: str | None = field(default=None, metadata={
        "help": "where the policy is trained once and reused; default: out/o1/policy, the one "
                "scripts/o1.py trains with the same settings (--tiny: OUT_DIR/policy)"})
    policy: str | None = field(default=None, metadata={
        "help": "a trained policy file (a minillm model with its tokenizer) to use instead"})
    pretrain_steps: int = field(default=200, metadata={"help": "policy pretraining steps"})
    sft_steps: int = field(default=400, metadata={"help": "policy fine-tuning steps"})
    level: int = field(default=3, metadata={"help": "digits per operand of the test problems"})
    questions: int = field(default=200, metadata={"help": "held-out problems"})
    initial_samples: int = field(default=20, metadata={"help": "AoR / voting: chains first drawn"})
    max_samples: int = field(default=40, metadata={"help": "dynamic sampling's limit"})
    extra_samples: int = field(default=5, metadata={"help": "chains per dynamic-sampling step"})
    local_batch: int = field(default=5, metadata={"help": "chains per local-scoring call"})
    representatives: int = field(default=3, metadata={"help": "chains kept per answer"})
    score_threshold: float = field(default=6.0, metadata={"help": "local scores (of 10) under "
                                                                  "it are dropped"})
    margin_threshold: float = field(default=2.0, metadata={
        "help": "dynamic sampling continues while the winning margin is under it"})
    temperature: float = 1.0
    max_new_tokens: int = field(default=0, metadata={
        "help": "per chain; 0: 20 x (level + 2), at most what the policy's positions hold"})
    batch_size: int = field(default=256, metadata={"help": "sequences per generation batch"})
    orm_questions: int = field(default=400, metadata={"help": "training problems for the ORM"})
    orm_samples: int = field(default=8, metadata={"help": "policy chains per ORM problem"})
    orm_steps: int = field(default=300, metadata={"help": "ORM training steps (32 chains each)"})
    orm_thresholds: list[float] = field(default_factory=lambda: [0.0], metadata={
        "help": "more local-score thresholds to run the ORM judge at, beside --score-threshold"})
    oracle_accuracy: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                         metadata={"help": "accuracies of the noisy oracle judges"})
    judge_url: str | None = field(default=None, metadata={
        "help": "an OpenAI-compatible server whose model judges too (LLMJudge), e.g. "
                "http://127.0.0.1:8000/v1"})
    judge_model: str | None = field(default=None, metadata={"help": "the served model's name"})
    judge_api: str = field(default="chat", metadata={"help": "chat or completions"})
    judge_max_new_tokens: int = field(default=256, metadata={"help": "per judge answer"})
    judge_timeout: float = field(default=120.0, metadata={"help": "seconds per judge request"})
    close_margin: float = field(default=0.25, metadata={
        "help": "the dynamic-sampling table splits questions at this vote margin "
                "((top1 - top2) / chains with an answer)"})
    seed: int = 0
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0: torch's default)"})


def check_config(cfg: AoRScriptConfig) -> AoRConfig:
    for name in ("questions", "batch_size", "orm_questions", "orm_samples", "orm_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.policy and cfg.policy_dir:
        raise UserError("--policy (a trained policy file) and --policy-dir (where one is trained): "
                        "give one")
    if cfg.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens}: must be at least 0 (0: auto)")
    if not 1 <= cfg.level <= 9:
        raise UserError(f"--level {cfg.level}: expected 1-9 digits per operand")
    if (cfg.judge_url is None) != (cfg.judge_model is None):
        raise UserError("--judge-url and --judge-model go together (the server and its model)")
    if cfg.judge_api not in ("chat", "completions"):
        raise UserError(f"--judge-api {cfg.judge_api!r}: expected chat or completions")
    if cfg.judge_max_new_tokens < 1 or cfg.judge_timeout <= 0:
        raise UserError("--judge-max-new-tokens must be at least 1 and --judge-timeout above 0")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature {cfg.temperature}: sampling needs a temperature above 0")
    bad = [a for a in cfg.oracle_accuracy if not 0 <= a <= 1]
    if bad:
        raise UserError(f"--oracle-accuracy {bad[0]}: expected a probability in [0, 1]")
    try:
        return AoRConfig(cfg.initial_samples, cfg.max_samples, cfg.extra_samples, cfg.local_batch,
                         cfg.representatives, cfg.score_threshold, cfg.margin_threshold)
    except ValueError as e:
        raise UserError(f"AoR settings: {e}") from None


# --- evaluation ----------------------------------------------------------------------------------

def question_kinds(problem: Problem, chains: list[str], close_margin: float) -> dict:
    """What the first chains say about a question: is the right answer sampled, is it a minority,
    is it outvoted, and the vote margin."""
    buckets = bucket_by_answer(chains)
    votes = sorted((len(v) for v in buckets.values()), reverse=True) + [0, 0]
    right = len(buckets.get(problem.answer, []))
    best_wrong = max((len(v) for a, v in buckets.items() if a != problem.answer), default=0)
    answered = sum(votes)
    margin = (votes[0] - votes[1]) / answered if answered else 0.0
    return {"sampled": right > 0, "minority": 0 < right < len(chains) / 2,
            "outvoted": 0 < right <= best_wrong, "one_answer": len(buckets) == 1,
            "close": len(buckets) != 1 and margin < close_margin}


def summarize(problems: list[Problem], answers: list[str | None], samples: list[int],
              kinds: list[dict]) -> dict:
    correct = [a == p.answer for p, a in zip(problems, answers)]

    def accuracy(kind: str | None) -> float | None:
        picked = [c for c, k in zip(correct, kinds) if kind is None or k[kind]]
        return sum(picked) / len(picked) if picked else None

    return {"accuracy": accuracy(None), "minority": accuracy("minority"),
            "outvoted": accuracy("outvoted"), "samples": sum(samples) / len(samples),
            "correct": correct, "per_question_samples": samples}


def run_aor(problems, pools, judge, cfg: AoRConfig) -> tuple[list[str | None], list[int]]:
    """AoR's answer and the chains it drew, per question, from the question's pool in order."""
    results = [aggregate(p, pool_sampler(pool), judge, cfg) for p, pool in zip(problems, pools)]
    return [r.answer for r in results], [r.samples for r in results]


def fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def print_table(rows: list[tuple[str, dict]], kinds: list[dict]) -> None:
    n_min = sum(k["minority"] for k in kinds)
    n_out = sum(k["outvoted"] for k in kinds)
    print(f"{'method':<34} {'samples/q':>9} {'all':>7} {f'minority ({n_min})':>15} "
          f"{f'outvoted ({n_out})':>15}")
    for name, s in rows:
        print(f"{name:<34} {s['samples']:>9.1f} {fmt(s['accuracy']):>7} {fmt(s['minority']):>15} "
              f"{fmt(s['outvoted']):>15}")


def print_spending(dynamic_rows: list[tuple[str, dict]], kinds: list[dict], close: float) -> None:
    groups = [("one answer", lambda k: k["one_answer"]),
              (f"vote margin >= {close:g}", lambda k: not k["one_answer"] and not k["close"]),
              (f"vote margin < {close:g}", lambda k: k["close"])]
    members = [[i for i, k in enumerate(kinds) if test(k)] for _, test in groups]
    print(f"{'dynamic sampling: samples/q':<34} "
          + " ".join(f"{f'{g} ({len(m)})':>24}" for (g, _), m in zip(groups, members)))
    for name, s in dynamic_rows:
        cells = []
        for m in members:
            mean = sum(s["per_question_samples"][i] for i in m) / len(m) if m else None
            cells.append(f"{'-' if mean is None else f'{mean:.1f}':>24}")
        print(f"{name:<34} " + " ".join(cells))


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(a right chain scores above a wrong one), ties counting half (None without both kinds)."""
    right = sorted(s for s, y in zip(scores, labels) if y)
    wrong = sorted(s for s, y in zip(scores, labels) if not y)
    if not right or not wrong:
        return None
    wins, lo, hi = 0.0, 0, 0
    for s in right:  # wrong scores below s, and equal to s
        while lo < len(wrong) and wrong[lo] < s:
            lo += 1
        hi = max(hi, lo)
        while hi < len(wrong) and wrong[hi] == s:
            hi += 1
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(right) * len(wrong))


# --- the policy, its samples and the ORM ---------------------------------------------------------

def policy_config(cfg: AoRScriptConfig) -> PolicyConfig:
    """The policy of scripts/o1.py by default (levels 1-3, 2 layers of 64, 200 + 400 steps), so
    that the two scripts train it once."""
    if cfg.tiny:
        return PolicyConfig(levels=[1, 2], problems_per_level=200, n_layer=1, n_embd=32,
                            pretrain_steps=cfg.pretrain_steps, sft_steps=cfg.sft_steps,
                            batch_size=8, seed=cfg.seed)
    return PolicyConfig(pretrain_steps=cfg.pretrain_steps, sft_steps=cfg.sft_steps, seed=cfg.seed)


def load_policy(cfg: AoRScriptConfig, pcfg: PolicyConfig, policy_source: Path) -> Policy:
    if cfg.policy is None:
        return train_policy(pcfg, policy_source)
    if not Path(cfg.policy).is_file():
        raise UserError(f"--policy {cfg.policy}: no such file")
    model, tok, _ = load_model(cfg.policy)
    if tok is None:
        raise UserError(f"--policy {cfg.policy}: the file carries no tokenizer")
    return Policy(model.eval(), tok)


def load_samples(cfg: AoRScriptConfig, policy, problems: list[Problem], key: dict,
                 path: Path) -> list[list[str]]:
    """`max_samples` chains per problem, sampled once and cached with the settings they came
    from; a cache from other settings is replaced."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["chains"]
    start = time.time()
    outs = sample(policy.lm(batch_size=cfg.batch_size), problems, cfg.max_samples,
                  temperature=cfg.temperature, max_new_tokens=key["max_new_tokens"], seed=cfg.seed)
    chains = [[c.text for c in row] for row in outs]
    tokens = sum(c.completion_tokens or 0 for row in outs for c in row)
    print(f"sampled {cfg.max_samples} chains for each of {len(problems)} questions "
          f"({tokens} tokens) in {time.time() - start:.0f} s")
    write_json(path, {"key": key, "chains": chains}, indent=1)
    return chains


def chain_tokens(tokenizer, problem: Problem, steps: list[str]) -> int:
    """Tokens the reward model reads for a chain (prompt, then each step and its newline)."""
    return (len(tokenizer.encode_ordinary(prompt(problem)))
            + sum(len(tokenizer.encode_ordinary(s + "\n")) for s in steps))


class WindowedORM:
    """The ORM's P(correct), and 0 for a chain too long for its positions (a runaway chain that
    filled `max_new_tokens`; the reward model refuses those)."""

    def __init__(self, orm: OutcomeRewardModel):
        self.orm, self.limit = orm, orm.backbone.config.block_size

    def score(self, problems: list[Problem], texts: list[str]) -> list[float]:
        fits = [chain_tokens(self.orm.tokenizer, p, split_steps(t)) <= self.limit
                for p, t in zip(problems, texts)]
        scored = iter(self.orm.score([p for p, f in zip(problems, fits) if f],
                                     [t for t, f in zip(texts, fits) if f]))
        return [next(scored) if f else 0.0 for f in fits]


def load_orm(cfg: AoRScriptConfig, policy, ops: str, key: dict, out_dir: Path
             ) -> OutcomeRewardModel:
    """The outcome reward model: trained once on the policy's samples of training problems at
    the test level (labels from the checker), then cached with its settings."""
    path, meta = out_dir / "orm.pt", out_dir / "orm.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        try:
            return OutcomeRewardModel.load(path)
        except (UserError, RuntimeError) as e:  # written by another version of minillm.methods.o1
            print(f"retraining the ORM: {path} does not load ({str(e).splitlines()[0]})")
    start = time.time()
    problems = Arithmetic(ops=ops).problems(cfg.level, cfg.orm_questions, "train", cfg.seed + 1)
    outs = sample(policy.lm(batch_size=cfg.batch_size), problems, cfg.orm_samples,
                  temperature=cfg.temperature, max_new_tokens=key["max_new_tokens"],
                  seed=cfg.seed + 1)
    examples = [e for e in outcome_examples(problems, [[c.text for c in row] for row in outs])
                if chain_tokens(policy.tokenizer, e.problem, e.steps)
                <= policy.model.config.block_size]
    if not examples:
        raise UserError("no sampled chain fits the reward model's positions: raise "
                        "--orm-questions or lower --max-new-tokens")
    right = sum(e.targets[-1] for e in examples)
    print(f"ORM data: {len(examples)} chains of {len(problems)} training problems, "
          f"{right / len(examples):.1%} right")
    orm = train_reward_model(OutcomeRewardModel, policy.model, policy.tokenizer, examples,
                             cfg.orm_steps, seed=cfg.seed, log=None)
    orm.save(path)
    write_json(meta, key, indent=1)
    print(f"trained the ORM ({cfg.orm_steps} steps) in {time.time() - start:.0f} s")
    return orm


# --- main ----------------------------------------------------------------------------------------

TINY = dict(out_dir="out/aor-tiny", questions=6, level=2, pretrain_steps=4, sft_steps=4,
            initial_samples=4, max_samples=8, extra_samples=2, max_new_tokens=24, orm_questions=8,
            orm_samples=2, orm_steps=3, oracle_accuracy=[0.5, 1.0])


def resolve(cfg: AoRScriptConfig, argv: list[str] | None = None) -> AoRScriptConfig:
    """The settings a run uses: `--tiny` shrinks those not given on the command line."""
    if not cfg.tiny:
        return cfg
    given = given_fields(AoRScriptConfig, argv)
    return replace(cfg, **{k: v for k, v in TINY.items() if k not in given})


def sample_settings(cfg: AoRScriptConfig) -> tuple[PolicyConfig, Path, dict]:
    """The policy's settings, its folder, and what the cached samples depend on."""
    pcfg = policy_config(cfg)
    policy_source = Path(cfg.policy or cfg.policy_dir
                         or (Path(cfg.out_dir) / "policy" if cfg.tiny else "out/o1/policy"))
    # a chain's steps take about 20 tokens each; prompt + chain must fit the policy's positions
    max_new = cfg.max_new_tokens or min(20 * (cfg.level + 2), pcfg.block_size - 4 * cfg.level - 8)
    key = {"policy": cfg.policy or asdict(pcfg), "policy_source": str(policy_source),
           "level": cfg.level, "questions": cfg.questions, "max_samples": cfg.max_samples,
           "temperature": cfg.temperature, "max_new_tokens": max_new, "seed": cfg.seed}
    return pcfg, policy_source, key


def main(argv=None):
    cfg = resolve(parse_config(AoRScriptConfig, argv, description=__doc__), argv)
    aor_cfg = check_config(cfg)
    if cfg.threads < 0:
        raise UserError(f"--threads {cfg.threads}: expected 0 (torch's default) or more")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.time()
    pcfg, policy_source, key = sample_settings(cfg)
    policy = load_policy(cfg, pcfg, policy_source)
    print(f"policy: {policy.model.num_params() / 1e6:.2f}M parameters, from {policy_source} "
          f"({time.time() - start:.0f} s)")
    if policy.model.wpe is not None and key["max_new_tokens"] + 16 > policy.model.config.block_size:
        raise UserError(f"the policy has {policy.model.config.block_size} positions: pass a "
                        f"--max-new-tokens below {policy.model.config.block_size - 16}")
    problems = Arithmetic(ops=pcfg.ops).problems(cfg.level, cfg.questions, "test", cfg.seed)
    pools = load_samples(cfg, policy, problems, key, out_dir / "samples.json")
    orm_key = {**key, "orm_questions": cfg.orm_questions, "orm_samples": cfg.orm_samples,
               "orm_steps": cfg.orm_steps}
    del orm_key["questions"], orm_key["max_samples"]
    orm_judge = ORMJudge(WindowedORM(load_orm(cfg, policy, pcfg.ops, orm_key, out_dir)))
    # one batched call for every chain AoR may judge (those with an answer)
    orm_judge.prefetch(problems, [[c for c in pool if extract_answer(c) is not None]
                                  for pool in pools])

    first = [pool[:cfg.initial_samples] for pool in pools]
    kinds = [question_kinds(p, c, cfg.close_margin) for p, c in zip(problems, first)]
    judged = [(p, c) for p, cs in zip(problems, first) for c in cs if extract_answer(c) is not None]
    orm_scores = [orm_judge.score(p, [c], "local")[0] for p, c in judged]  # cached: prefetched
    labels = [check(p, c) for p, c in judged]
    orm_auc = auc(orm_scores, labels)
    means = [sum(s for s, y in zip(orm_scores, labels) if y == want)
             / max(sum(y == want for y in labels), 1) for want in (True, False)]
    print(f"ORM on the first {cfg.initial_samples} chains with an answer ({len(judged)}): mean "
          f"score {means[0]:.2f} / 10 on right chains, {means[1]:.2f} on wrong ones, AUC "
          f"{'-' if orm_auc is None else f'{orm_auc:.3f}'}; {cfg.score_threshold:g} or more: "
          f"{sum(s >= cfg.score_threshold for s in orm_scores)}")
    n = len(problems)
    rows = []
    for name, chains in ((f"pass@{cfg.initial_samples} (ceiling)", first),
                         (f"pass@{cfg.max_samples} (ceiling)", pools)):
        answers = [p.answer if any(check(p, c) for c in cs) else None
                   for p, cs in zip(problems, chains)]
        rows.append((name, summarize(problems, answers, [len(c) for c in chains], kinds)))
    for chains in (first, pools):
        answers = [majority_vote(c) for c in chains]
        rows.append((f"majority@{len(chains[0])}",
                     summarize(problems, answers, [len(c) for c in chains], kinds)))
    # the ORM's probabilities rarely reach the threshold of 6 / 10, which then drops every chain
    # (and AoR falls back to voting): lower thresholds show what its ranking does
    judges = [("constant", ConstantJudge(), aor_cfg), ("ORM", orm_judge, aor_cfg)]
    judges += [(f"ORM, threshold {t:g}", orm_judge, replace(aor_cfg, score_threshold=t))
               for t in cfg.orm_thresholds]
    judges += [(f"oracle {a:g}", NoisyOracleJudge(a, seed=cfg.seed), aor_cfg)
               for a in cfg.oracle_accuracy]
    llm_judge = None
    if cfg.judge_url:
        llm_judge = LLMJudge(OpenAIClient(cfg.judge_url, cfg.judge_model, api=cfg.judge_api,
                                          timeout=cfg.judge_timeout), cfg.judge_max_new_tokens)
        judges.append((f"LLM {cfg.judge_model}", llm_judge, aor_cfg))
    dynamic_rows = []
    for name, judge, judge_cfg in judges:
        static_cfg = replace(judge_cfg, max_samples=judge_cfg.initial_samples)
        for label, acfg in ((f"AoR@{cfg.initial_samples}", static_cfg),
                            (f"AoR dynamic {cfg.initial_samples}-{cfg.max_samples}", judge_cfg)):
            answers, samples = run_aor(problems, pools, judge, acfg)
            rows.append((f"{label}, {name}", summarize(problems, answers, samples, kinds)))
            if acfg is judge_cfg:
                dynamic_rows.append((f"{label}, {name}", rows[-1][1]))
    print(f"\n{n} held-out {cfg.level}-digit questions; minority: the right answer on fewer than "
          f"half of the first {cfg.initial_samples} chains (but on some); outvoted: some wrong "
          "answer has at least as many of them")
    print_table(rows, kinds)
    print()
    print_spending(dynamic_rows, kinds, cfg.close_margin)
    if llm_judge is not None:
        st = llm_judge.stats
        print(f"\nLLM judge {cfg.judge_model} at {cfg.judge_url}: {st['prompts']} prompts, "
              f"{st['chains']} chains scored, {st['unparsed']} scores unreadable (scored 0), "
              f"{st['completion_tokens']} tokens generated")
    results = {"config": asdict(cfg), "policy_source": str(policy_source),
               "questions": [{"question": p.question, "answer": p.answer, **k}
                             for p, k in zip(problems, kinds)],
               "rows": {name: s for name, s in rows}, "orm_auc": orm_auc,
               "llm_judge": llm_judge.stats if llm_judge is not None else None,
               "seconds": time.time() - start}
    write_json(out_dir / "results.json", results, indent=1)
    print(f"\nwrote {out_dir / 'results.json'} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    run_main(main)
