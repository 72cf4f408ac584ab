"""WanJuan-CC (Qiu et al. 2024): a Common Crawl pre-training data pipeline.

Stages, one file each: `read` (WARC, JSONL, text files), `extract` (HTML to main text),
`language` (keep English), `rules` (Gopher / C4 heuristics), `minhash` (fuzzy deduplication),
`safety` (blocklists, PII masking, toxicity and adult scores), `quality` (fastText-style
classifiers, perplexity), and `limits` (per-document size, depth and CPU time). `pipeline` runs
them over shards, split across ranks, through files, and accounts for every input record.
Output records carry `toxic_score`, `porn_score`, `fluency_score` and `not_ad_score`, as the
WanJuan-CC release does, so that users choose thresholds afterwards.
"""

from .pipeline import Pipeline, PipelineConfig, format_report, run

__all__ = ["Pipeline", "PipelineConfig", "format_report", "run"]
