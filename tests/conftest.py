"""Test-wide settings: Megatron's jit fuser is torch.compile; a cold compile costs seconds per test on CPU."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
