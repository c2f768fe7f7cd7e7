"""Metric loggers: null by default; TensorBoard event files hold exactly the metrics.jsonl
names and values; a backend asked for but not installed is a ConfigError before any model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lora_dpo.config import load_config
from lora_dpo.demo import demo_config
from lora_dpo.errors import ConfigError
from lora_dpo.loggers import FanOut, MetricLogger, NullLogger, check_backends, open_logger, scalars
from lora_dpo.metrics import peak_memory_mb
from lora_dpo.run.metrics_file import MetricsFile


class Recorder(MetricLogger):
    def __init__(self):
        self.records, self.closed = [], False

    def log(self, record):
        self.records.append(dict(record))

    def close(self):
        self.closed = True


@pytest.mark.parametrize("report_to", [[], ["none"]])
def test_null_logger_is_the_default(report_to, tmp_path):
    assert isinstance(open_logger(report_to, tmp_path, {}), NullLogger)
    assert load_config(None).train.report_to == []
    assert not (tmp_path / "tensorboard").exists()


def test_report_to_is_validated():
    assert load_config(None, ["train.report_to=tensorboard,wandb"]).train.report_to == [
        "tensorboard",
        "wandb",
    ]
    with pytest.raises(ConfigError, match="train.report_to='tb': must be none, tensorboard or wandb"):
        load_config(None, ["train.report_to=tb"])
    with pytest.raises(ConfigError, match="unknown 'mlflow'"):
        open_logger(["mlflow"], Path("."), {})


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_backend_that_is_not_installed_is_a_config_error(backend, module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # `import` of it now raises ImportError
    message = rf"train.report_to includes {backend}, but the {backend} package is not installed: pip install 'lora-dpo\[{backend}\]'"
    with pytest.raises(ConfigError, match=message):
        check_backends([backend])
    with pytest.raises(ConfigError, match=message):
        open_logger([backend], tmp_path, {})


def test_train_refuses_a_missing_backend_before_loading_anything(demo_workdir, tmp_path, monkeypatch):
    from lora_dpo.train import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    config = demo_config(demo_workdir)
    config.train.output_dir = str(tmp_path / "run")
    config.train.report_to = ["wandb"]
    config.precompute.cache_dir = str(tmp_path / "no-cache-needed")
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_metrics_file_passes_each_stamped_record_to_its_logger(tmp_path):
    recorder = Recorder()
    metrics = MetricsFile(tmp_path / "metrics.jsonl", FanOut([recorder, NullLogger()]), started=0.0)
    metrics.write({"step": 0, "eval/rewards/accuracies": 0.5})
    metrics.write({"step": 1, "loss": 0.69, "lr": 1e-4})
    metrics.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recorder.records == written and recorder.closed
    assert all(r["elapsed_s"] > 0 for r in written)
    assert scalars(written[1]) == {"loss": 0.69, "lr": 1e-4, "elapsed_s": written[1]["elapsed_s"]}


def test_peak_memory_on_the_cpu_is_the_process_peak_rss_in_mb():
    import torch

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs Linux /proc")
    peak = peak_memory_mb(torch.device("cpu"))
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    high_water_mb = int(fields["VmHWM"].split()[0]) / 1024  # the kernel's peak RSS, in kB
    assert 0.9 * high_water_mb <= peak <= 1.1 * high_water_mb  # a unit slip would be 1024x


def test_tensorboard_events_hold_the_metrics_jsonl_names_and_values(demo_workdir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_dpo.train import train
    from precompute import precompute_reference

    config = demo_config(demo_workdir)
    config.data.max_pairs = 16
    config.precompute.cache_dir = str(tmp_path / "cache")
    config.train.output_dir = str(tmp_path / "run")
    config.train.max_steps = 3
    config.train.logging_steps = 1
    config.train.report_to = ["tensorboard"]
    precompute_reference(config)
    train(config)

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = {name for record in records for name in record if name != "step"}
    assert {"loss", "rewards/margins", "logps/chosen", "eval/rewards/accuracies", "peak_memory_mb"} <= names

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == names
    for name in names:
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        expected = [(r["step"], r[name]) for r in records if name in r]
        assert [s for s, _ in logged] == [s for s, _ in expected], name
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), name


def test_wandb_offline_run_gets_the_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = open_logger(["wandb"], tmp_path, {"train": {"beta": 0.1}})
    logger.log({"step": 1, "loss": 0.69})
    logger.close()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_a_resumed_run_keeps_its_tensorboard_history(demo_workdir, tmp_path, monkeypatch):
    """Crash at step 10 (checkpoint at 8), resume: each step's curve point is there once, with
    the value metrics.jsonl holds; steps 9-10 of the crashed attempt are purged, not doubled."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_dpo.train import train
    from runs import interrupt, prepare_workdir, run_config

    workdir = prepare_workdir(demo_workdir, tmp_path / "work")
    run_dir = tmp_path / "run"
    config = run_config(workdir, run_dir)
    config.train.report_to = ["tensorboard"]
    interrupt(config, 10, monkeypatch)
    train(config, resume=True)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [step for step, _ in expected] == list(range(1, 13))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # nothing deleted
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)
