"""run.device on a machine without a GPU: what each setting resolves to (GPUs faked), that every command
resolves it before doing anything (an unavailable device is a one-line error), that the reference model
follows it, and where a vLLM worker process goes and how it is synced. The GPU check
(benchmarks/gpu_check.sh) covers the rest on a real GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import grpo.vllm_generator
from cli import app
from grpo.distributed import compute_device, resolve_device
from grpo.generation import GeneratorConfig, build_generator
from grpo.models import save_model
from grpo.vllm_generator import _visible_name, worker_placement
from pipeline.config import RunConfig
from pipeline.runs import load_reference
from tests.toy import toy_model, toy_tokenizer

runner = CliRunner()
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_settings_resolve_to_this_process_gpu(monkeypatch):
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    # under torchrun each rank takes its LOCAL_RANK's GPU; one GPU for all ranks is refused
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="each rank uses its own GPU"):
        resolve_device("cuda:0")
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")


def test_an_offloaded_sharded_model_computes_on_this_process_gpu_not_where_its_shards_are(monkeypatch):
    """FSDP2 with CPUOffloadPolicy keeps the shards on the CPU (DTensors on a CUDA device mesh) and computes on
    the GPU, so the inputs of every forward (rollout, scoring, update, SFT) go to this process's GPU; a plain
    model, or one sharded on the CPU, computes where its weights are."""
    fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    model = toy_model()
    assert compute_device(model) == torch.device("cpu")
    for mesh_type, expected in (("cuda", torch.device("cuda", 1)), ("cpu", torch.device("cpu"))):
        for param in model.parameters():
            param.device_mesh = SimpleNamespace(device_type=mesh_type)  # what an FSDP2 shard carries
        assert compute_device(model) == expected


@no_gpu
@pytest.mark.parametrize(
    "command",
    [
        ["sft", "--model", "tiny"],
        ["train", "--model", "tiny", "--reward", "validity"],
        ["sample", "--model", "tiny", "--num-formulas", "1"],
    ],
    ids=lambda c: c[0],
)
def test_every_command_refuses_an_unavailable_device_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.delenv("CRYSTAL_GRPO_DATA", raising=False)
    out = tmp_path / ("samples.jsonl" if command[0] == "sample" else "run")
    result = runner.invoke(app, [*command, "--out", str(out), "--set", "run.device=cuda:3"])
    assert result.exit_code == 1
    assert "run.device: device 'cuda:3': this machine has no CUDA device" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything was written


def test_the_reference_model_follows_run_device_in_the_compute_dtype(tmp_path, monkeypatch):
    """No GPU here: the meta device stands in for the run's device (a model moved there keeps its shapes)."""
    path = save_model(toy_model(seed=0), toy_tokenizer(), tmp_path / "model")
    monkeypatch.setattr("pipeline.runs.resolve_device", lambda spec: torch.device("meta"))
    reference = load_reference(RunConfig(compute_dtype="bfloat16"), str(path))
    assert {(p.device.type, p.dtype, p.requires_grad) for p in reference.parameters()} == {
        ("meta", torch.bfloat16, False)
    }


def test_a_vllm_worker_takes_a_gpu_of_its_own_for_nccl():
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert worker_placement(cpu, {0}, 0) == (None, "gloo")
    assert worker_placement(gpu0, {0}, 2) == (1, "nccl")
    assert worker_placement(gpu1, {1}, 2) == (0, "nccl")
    # one GPU: NCCL cannot join two processes on it, the weights go through host memory
    assert worker_placement(gpu0, {0}, 1) == (0, "gloo")
    # two ranks under torchrun on GPUs 0 and 1: the worker takes GPU 2, or shares rank 0's
    assert worker_placement(gpu0, {0, 1}, 3) == (2, "nccl")
    assert worker_placement(gpu0, {0, 1}, 2) == (0, "gloo")


def test_the_worker_gpu_is_named_in_this_process_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_name(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert _visible_name(1) == "5"


def test_build_generator_gives_the_vllm_worker_the_trainers_device(tmp_path, monkeypatch):
    seen = {}

    class Worker:
        def __init__(self, path, tokenizer, config, *, device="cpu"):
            seen["device"], seen["path"] = device, path

    monkeypatch.setattr(grpo.vllm_generator, "VLLMServerGenerator", Worker)
    build_generator(GeneratorConfig(kind="vllm-server"), toy_model(), toy_tokenizer(), tmp_path / "engine")
    assert seen["device"] == torch.device("cpu") and (seen["path"] / "config.json").is_file()
