"""The PPO engine: frozen settings (:mod:`~rlhf_cli.ppo.settings`, torch-free) and the trainer
(:class:`~rlhf_cli.ppo.engine.PPOEngine`) with its forward passes, stats, collectives and construction.

Builds on :mod:`rlhf_cli.algo` and never imports the TRL layer (:mod:`rlhf_cli.trl`). Nothing is
imported here, so ``rlhf_cli.ppo.settings`` stays free of torch for the command line's schema.
"""
