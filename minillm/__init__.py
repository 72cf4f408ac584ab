"""minillm: a readable, complete PyTorch framework for training and studying language models.

Core primitives live in this package (tokenizer, corpus, data, sft, model, generate, evaluate,
train, distributed, hf, moe, ...); each research method is one file (or, for the WanJuan-CC
pipeline, one package) beside them. See DESIGN.md for the architecture.
"""

__version__ = "0.1.0"
