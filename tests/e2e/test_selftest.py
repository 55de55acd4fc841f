"""``vespo-megatron selftest --device cpu``: every phase runs on the tiny configs and every JSON field is sound."""

from __future__ import annotations

import json
import math

import pytest

from vespo_megatron.cli import main as cli_main
from vespo_megatron.selftest import model_flops_utilisation

pytestmark = pytest.mark.slow


def test_selftest_on_cpu_reports_every_field(capsys):
    assert cli_main(["selftest", "--device", "cpu", "--json", "--steps", "3"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["ok"] is True and report["seconds"] > 0
    assert report["torch"].startswith("2.")
    for phase, active in (("dense", 87360), ("moe", None)):
        figures = report[phase]
        assert figures["steps"] == 3 and figures["loss_finite"] is True
        assert figures["seconds"] > 0 and figures["step_s"] > 0 and figures["tokens_per_s"] > 0
        assert figures["mfu"] is None  # no peak FLOP/s is known for a CPU
        # the KV decoder's per-token log-probs against the training forward, same weights, fp32
        assert 0 <= figures["mismatch_seq_abs_log_ratio_max"] < 1e-4, figures
        assert figures["peak_memory_mib"] > 0 and figures["estimate_mib"] > 0
        assert figures["transformer_impl"] == "local"
        assert figures["active_parameters"] == active if active else figures["active_parameters"] > 0
    assert report["resume"] == {"records_equal": True, "weights_equal": True}


def test_mfu_is_six_n_tokens_over_the_known_peak():
    assert model_flops_utilisation(10**9, 1000.0, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(6e12 / 989.4e12)
    assert model_flops_utilisation(10**9, 1000.0, 1.0, "cpu") is None
    assert model_flops_utilisation(10**9, 1000.0, 0.0, "NVIDIA H200") is None
    assert math.isclose(model_flops_utilisation(2, 3.0, 4.0, "A100-SXM4-80GB"), 6 * 2 * 3 / 4 / 312e12)


@pytest.mark.parametrize("argv, message", [(["--phases", "dense,warp"], "--phases"), (["--steps", "1"], "--steps")])
def test_bad_flags_name_the_flag(argv, message, capsys):
    assert cli_main(["selftest", "--device", "cpu", *argv]) != 0
    assert message in capsys.readouterr().err
