"""The label value of a token that is not trained.

-100 is the `ignore_index` default of PyTorch's cross-entropy (torch.nn.CrossEntropyLoss), and what transformers'
causal-LM losses and data collators skip; every module that writes or reads labels uses this one name for it.
"""

IGNORE = -100
