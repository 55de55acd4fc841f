"""vespo_megatron: VESPO off-policy RL for dense and MoE GPT models on Megatron-Core."""

__version__ = "0.1.0"
