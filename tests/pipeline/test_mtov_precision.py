"""The pipeline's mtov.precision=auto on the CPU: measured once (MToV.calibration), read back on the next
run, measured again with --recalibrate; the choice keys the mtov stage and the log says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import MToV.calibration as calibration
from data.sample_data import write_reference_video, write_speech
from moditalker.errors import UserError
from pipeline.inference import main

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "inference_tiny.yaml")


def test_auto_precision_measured_kept_recalibrated_and_keyed(tmp_path, monkeypatch, capsys, one_thread):
    speech = write_speech(tmp_path / "speech.wav", seconds=1.0)
    video = write_reference_video(tmp_path / "ref.mp4", seconds=1.0)
    measured = []
    times = {"autoencoders": {"int8": 4.0, "fp32": 10.0}, "unet": {"fp32": 1.0}}

    def fake_measure(models, timer=None, cpu_seconds=None):  # full-size networks on a CPU where int8 pays
        measured.append(models.config.unet.model_channels)
        return json.loads(json.dumps(times))

    monkeypatch.setattr(calibration, "measure", fake_measure)
    monkeypatch.setattr(calibration, "_config_params", lambda config: 10**9)  # not the tiny size rule
    monkeypatch.setattr(calibration, "_load_average", lambda: 0.5)  # an idle machine, whatever runs beside
    cal_file = tmp_path / "calibration" / "cal.json"
    out = tmp_path / "talk.mp4"
    argv = ["--audio", str(speech), "--ref_video", str(video), "--out", str(out), "--random_weights"]
    argv += ["--config", TINY, "--calibration_file", str(cal_file)]

    first = main(argv)
    log = capsys.readouterr()
    log = log.out + log.err
    assert len(measured) == 1 and cal_file.is_file()
    assert "[mtov] precision auto on this CPU (measured" in log and "autoencoders int8: 2.50x" in log
    assert "autoencoders int8, UNet fp32, auto measured" in log
    entry = first.stages["mtov"]

    second = main(argv + ["--overwrite"])  # read back: nothing timed, the stage result reused
    log = capsys.readouterr().out
    assert len(measured) == 1 and "calibrated before" in log
    assert second.stages["mtov"].cached and second.stages["mtov"].key == entry.key

    times["autoencoders"]["int8"] = 9.5  # int8 no longer pays: fp32, another key
    third = main(argv + ["--overwrite", "--recalibrate"])
    log = capsys.readouterr().out
    assert len(measured) == 2 and "unet fp32" in log and "autoencoders fp32: int8 only 1.05x" in log
    assert not third.stages["mtov"].cached and third.stages["mtov"].key != entry.key


def test_fixed_precision_is_not_measured(tmp_path, monkeypatch):
    def no_measure(*a, **k):
        raise AssertionError("a given precision is not measured")

    monkeypatch.setattr(calibration, "measure", no_measure)
    monkeypatch.setattr(calibration, "_config_params", lambda config: 10**9)
    cal = calibration.resolve_plan("int8", no_measure, torch.device("cpu"))
    assert cal.source == "fixed" and cal.plan.autoencoders == "int8"
    with pytest.raises(UserError, match="precision must be one of"):
        calibration.resolve_plan("fp16", no_measure, torch.device("cpu"))
