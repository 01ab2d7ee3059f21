"""The pure math of RLHF with PPO and its critic-free relatives: tensors in, tensors out.

Imports nothing from the rest of ``rlhf_cli``; :mod:`rlhf_cli.algo.names` (torch-free) declares the
names the math answers to. Modules: ``functional`` (log-probabilities, entropy, masked statistics,
score processing, per-token rewards, GAE, losses), ``kl`` (KL penalties and the KL loss term),
``kl_control`` (KL coefficient controllers), ``running_moments``, ``advantages`` (the estimators),
``chunked_logprobs`` (the LM head and log-softmax a chunk of tokens at a time).
"""
