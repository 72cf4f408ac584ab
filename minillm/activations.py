"""The FFN activations by name, shared by the dense FFN (model.py) and the experts (moe.py).

"swiglu" is SiLU applied to the gate projection, then multiplied by the up projection (the caller
does the product); the others apply to the up projection alone."""

import torch.nn.functional as F

ACTIVATIONS = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "swiglu": F.silu,  # applied to the gate, then multiplied by the up projection
}
