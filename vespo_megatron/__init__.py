"""vespo_megatron: VESPO off-policy RL for dense and MoE GPT models on Megatron-Core."""

from vespo_megatron.runtime.quiet import default_cuda_device_max_connections, silence_fallback_notices

__version__ = "0.1.0"

# Before anything imports megatron.core: its fallback notices fire at import time.
silence_fallback_notices()
default_cuda_device_max_connections()
