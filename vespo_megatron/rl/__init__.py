"""The RL loop: rollouts, rewards, group advantages, stale mini-batch updates."""
