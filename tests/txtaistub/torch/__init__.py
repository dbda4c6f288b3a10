"""A stand-in for torch, for txtai in the parity tests only (see tests/txtaioracle.py).

txtai's workflow tasks import torch for one question in their merges, whether an action's
outputs are tensors; no action of the tests returns one. Anything else asked of this module
fails, as torch's absence would.
"""


def is_tensor(value: object) -> bool:
    """No value here is a tensor."""
    return False
