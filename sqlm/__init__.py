"""sqlm: causal language models trained as soft Q-learners.

A causal LM's logits are read as Q-values: ``Q = tau * logits``,
``V = tau * logsumexp(logits)`` and ``pi = softmax(logits)``.
"""

__version__ = "0.1.0"
