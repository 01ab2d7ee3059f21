"""Legacy TRL 0.11's PPO surface on top of the engine: ``PPOConfig``, ``PPOTrainer`` with TRL's
protected methods, its generation helpers, dataloader and collation, and ``core``.

The engine (:mod:`rlhf_cli.ppo`) never imports this package; ``rlhf_cli.PPOTrainer``,
``rlhf_cli.PPOConfig`` and ``rlhf_cli.core`` are its public names.
"""
