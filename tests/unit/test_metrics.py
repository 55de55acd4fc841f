"""MetricsLogger, read_metrics, ProgressBar and the plotting module, on a temporary run directory."""

import io
import json
import math
import sys
import types

import pytest
import yaml

from vespo_megatron import plotting
from vespo_megatron.metrics import MetricsLogger, ProgressBar, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_metrics(step: int) -> dict[str, float]:
    return {
        "reward/mean": 0.1 * step,
        "reward/accuracy": min(1.0, 0.05 * step),
        "loss/value": 1.0 / step,
        "grad_norm": 2.0 + math.sin(step),
        "vespo/phi_mean_pos": 0.9,
        "vespo/phi_mean_neg": math.nan if step % 3 == 0 else 0.4,
        "vespo/log_w_abs_mean": 0.01 * step,
        "vespo/num_pos": 4,
        "response/length_mean": 10.0 + step,
        "time/rollout": 0.5,
        "time/train": 0.3,
        "throughput/tokens_per_s": 1000.0 + step,
    }


def write_run(run_dir, steps=range(1, 21)):
    with MetricsLogger(run_dir, enabled=True, tensorboard=False) as logger:
        for step in steps:
            logger.log(step, synthetic_metrics(step))
    return run_dir


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))


def test_jsonl_written_and_read_back(tmp_path):
    config = {"loss": {"name": "vespo", "k_pos": 2.0}, "train": {"steps": 3}}
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False, config_dict=config) as logger:
        logger.log(1, {"reward/mean": 0.5, "vespo/num_pos": 3})
        logger.log(2, {"reward/mean": 0.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["step"] == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert without_time(records) == [{"step": 1, "reward/mean": 0.5, "vespo/num_pos": 3},
                                      {"step": 2, "reward/mean": 0.75}]
    assert all(isinstance(r["time"], float) for r in records)
    assert read_metrics(tmp_path) == records  # a run directory works too
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config


def test_non_finite_values_are_strings_on_disk_and_floats_when_read(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        logger.log(1, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 1.5})
    line = (tmp_path / "metrics.jsonl").read_text()
    raw = json.loads(line)  # strict JSON: no bare NaN/Infinity
    assert (raw["a"], raw["b"], raw["c"], raw["d"]) == ("nan", "inf", "-inf", 1.5)
    record = read_metrics(tmp_path)[0]
    assert math.isnan(record["a"]) and record["b"] == math.inf and record["c"] == -math.inf


def test_reserved_and_non_numeric_keys_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(1, {"name": "vespo"})


def test_truncated_last_line_is_tolerated(tmp_path):
    write_run(tmp_path, steps=range(1, 4))
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "time": 1.0, "reward/me')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_resume_with_truncate_after_matches_uninterrupted_run(tmp_path):
    straight = write_run(tmp_path / "straight", steps=range(1, 11))

    resumed = tmp_path / "resumed"
    write_run(resumed, steps=range(1, 8))  # checkpoint at step 5, then killed after step 7 ...
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "ti')  # ... in the middle of writing step 8
    with MetricsLogger(resumed, enabled=True, tensorboard=False, resume=True) as logger:
        logger.truncate_after(5)
        assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4, 5]
        for step in range(6, 11):
            logger.log(step, synthetic_metrics(step))

    assert json.dumps(without_time(read_metrics(resumed))) == json.dumps(without_time(read_metrics(straight)))


def test_resume_without_truncate_drops_torn_line_and_appends(tmp_path):
    write_run(tmp_path, steps=range(1, 3))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "ti')
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume=True) as logger:
        logger.log(3, {"reward/mean": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_resume_and_truncate_refuse_a_corrupt_line_before_the_last(tmp_path):
    write_run(tmp_path, steps=range(1, 4))
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"step": 2, "reward', lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        with MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume=True) as logger:
            logger.truncate_after(3)
    path.write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is list, not a JSON object"):
        read_metrics(path)


def test_fresh_run_overwrites_old_metrics(tmp_path):
    write_run(tmp_path, steps=range(1, 6))
    write_run(tmp_path, steps=range(1, 3))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_tensorboard_event_file_created(tmp_path):
    with MetricsLogger(tmp_path, enabled=True, tensorboard=True) as logger:
        logger.log(1, {"reward/mean": 0.5, "vespo/phi_mean_neg": math.nan})
        logger.truncate_after(0)
        logger.log(1, {"reward/mean": 0.25})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, enabled=False, tensorboard=True, wandb_project="p", config_dict={"a": 1},
                       resume=True) as logger:
        logger.log(1, {"reward/mean": 0.5})
        logger.truncate_after(0)
    assert not run_dir.exists()
    bar = ProgressBar(10, enabled=False, file=io.StringIO())
    bar.update(10, {"reward/mean": 1.0})
    bar.close()
    assert bar._file.getvalue() == ""


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="wandb_project='my-proj'.*pip install"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="my-proj")


def test_wandb_receives_metrics_and_keeps_run_id_on_resume(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        util=types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}"),
        init=lambda **kw: calls.append(("init", kw)) or FakeRun(),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="p", config_dict={"a": 1}) as lg:
        lg.log(1, {"reward/mean": 0.5})
    with MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="p", resume=True):
        pass
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["project"] == "p" and inits[0]["config"] == {"a": 1}
    assert inits[1]["id"] == inits[0]["id"]
    assert ("log", 1, {"reward/mean": 0.5}) in calls


def test_progress_bar_prints_plain_lines_when_not_a_tty(tmp_path):
    out = io.StringIO()  # not a TTY
    with ProgressBar(10, enabled=True, file=out, print_every=4) as bar:
        for step in range(1, 11):
            bar.update(step, {"reward/mean": 0.5, "reward/accuracy": 0.25, "loss/value": 1.0})
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/10", "8/10", "10/10"]
    assert "reward=0.5" in lines[0] and "acc=0.25" in lines[0] and "loss=1" in lines[0] and "eta=" in lines[0]


def test_progress_bar_uses_tqdm_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with ProgressBar(5, enabled=True, initial=2, file=out) as bar:
        assert bar.interactive
        bar.update(3, {"reward/mean": 0.5})
        bar.update(5, {"reward/mean": 0.75})
    assert "5/5" in out.getvalue()


def test_plot_run_writes_non_empty_pngs(tmp_path):
    run_dir = write_run(tmp_path / "run")
    paths = plotting.plot_run(run_dir)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{g.name}.png" for g in plotting.PLOT_GROUPS)
    assert all(p.parent == run_dir / "plots" for p in paths)
    for path in paths:
        assert_png(path)


def test_plot_run_skips_groups_without_data_and_honours_keys(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, enabled=True, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward/mean": float(step), "grad_norm": math.nan})
    assert [p.name for p in plotting.plot_run(run_dir)] == ["reward.png"]
    paths = plotting.plot_run(run_dir, out_dir=tmp_path / "custom", keys=["reward/"])
    assert [p.name for p in paths] == ["reward.png"] and paths[0].parent == tmp_path / "custom"
    with pytest.raises(ValueError, match="no metric with data"):
        plotting.plot_run(run_dir, keys=["grad_norm"])


def test_plot_runs_overlays_runs(tmp_path):
    runs = [write_run(tmp_path / f"stale{s}", steps=range(1, 11 + s)) for s in (0, 2, 4)]
    out = plotting.plot_runs(runs, ["s=0", "s=2", "s=4"], "reward/mean", tmp_path / "overlay" / "reward.png")
    assert_png(out)
    with pytest.raises(ValueError, match="one label per run"):
        plotting.plot_runs(runs, ["only one"], "reward/mean", tmp_path / "x.png")


def test_ema_skips_non_finite_values():
    smoothed = plotting.ema([math.nan, 1.0, math.nan, 1.0], weight=0.5)
    assert math.isnan(smoothed[0]) and smoothed[1:] == [1.0, 1.0, 1.0]


def test_cli_main_writes_files(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert plotting.main([str(run_dir), "--out", str(tmp_path / "out"), "--keys", "reward/mean", "vespo/"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.split("/")[-1] for p in printed) == ["reward_mean.png", "vespo.png"]
    for name in ("reward_mean.png", "vespo.png"):
        assert_png(tmp_path / "out" / name)


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plotting.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--out" in text and "--keys" in text
    with pytest.raises(SystemExit) as exit_info:
        plotting.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
