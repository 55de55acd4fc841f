"""Start-up fallback notices are filtered; every other warning still reaches the user."""

import subprocess
import sys


def _stderr_of(code: str, **env) -> str:
    import os

    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stderr


PROGRAM = """
import logging, warnings
import vespo_megatron
warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
warnings.warn("Apex is not installed. Falling back to Torch Norm")
logging.basicConfig()
logging.getLogger("megatron.core.rerun_state_machine").warning("Implicit initialization of Rerun State Machine!")
warnings.warn("a warning the user must see")
logging.getLogger("megatron.core.rerun_state_machine").warning("RerunStateMachine initialized in mode RerunMode.VALIDATE_RESULTS")
"""


def test_fallback_notices_are_filtered_and_others_kept():
    stderr = _stderr_of(PROGRAM, VESPO_SHOW_FALLBACK_NOTICES="0")
    assert "Apex" not in stderr and "Implicit initialization" not in stderr
    assert "a warning the user must see" in stderr
    assert "VALIDATE_RESULTS" in stderr  # only the disabled-by-default announcement is filtered


def test_filter_can_be_turned_off():
    stderr = _stderr_of(PROGRAM, VESPO_SHOW_FALLBACK_NOTICES="1")
    assert "Transformer Engine and Apex are not installed" in stderr
    assert "Implicit initialization" in stderr


def test_cuda_device_max_connections_defaults_to_one_and_keeps_user_value():
    code = "import os, vespo_megatron; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"
    import os

    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "CUDA_DEVICE_MAX_CONNECTIONS": "4"}, timeout=120)
    assert out.stdout.strip() == "4"
