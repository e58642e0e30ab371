"""kdlib.device: the devices a run may train on, the processor and the kind of machine that
records and benchmarks name, and synchronisation. No GPU needed: /proc/cpuinfo, the platform's
processor name and torch.cuda are stood in for where a test needs another machine."""
from __future__ import annotations

import pytest
import torch

import kdlib.device as dev


# ----------------------------------------------------------------------------- pick_device
@pytest.mark.parametrize("preference", ["meta", "mps"])
def test_pick_device_refuses_a_device_type_it_does_not_train_on(preference):
    with pytest.raises(ValueError, match=f"device='{preference}' is not supported"):
        dev.pick_device(preference)


@pytest.mark.parametrize("preference", [1.5, ["cpu"]])
def test_pick_device_refuses_what_is_not_a_device_name(preference):
    with pytest.raises(ValueError, match="is unknown; accepted"):
        dev.pick_device(preference)


# ----------------------------------------------------------------------------- cpu_model
AMD = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
       "model name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: fpu vme\n\n")
XEON = ("processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
        "model name\t: Intel(R) Xeon(R) Processor\n\n")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    """Set what /proc/cpuinfo reads (None: there is none) and what the platform names."""
    def use(text: str | None, platform_name: str = ""):
        class FakePath:
            def __init__(self, path):
                assert str(path) == "/proc/cpuinfo"

            def read_text(self):
                if text is None:
                    raise FileNotFoundError("/proc/cpuinfo")
                return text

        monkeypatch.setattr(dev, "Path", FakePath)
        monkeypatch.setattr(dev.platform, "processor", lambda: platform_name)

    return use


def test_cpu_model_is_the_first_processors_name_family_and_model(cpuinfo):
    cpuinfo(AMD + XEON, platform_name="x86_64")
    assert dev.cpu_model() == "AMD EPYC 9654 96-Core Processor (family 25, model 17)"


def test_cpu_model_without_a_model_number_is_the_bare_name(cpuinfo):
    cpuinfo("processor\t: 0\ncpu family\t: 6\nmodel name\t: Some Virtual CPU\n\n")
    assert dev.cpu_model() == "Some Virtual CPU"


def test_cpu_model_without_a_model_name_is_the_platforms_name_or_none(cpuinfo):
    cpuinfo(ARM, platform_name="aarch64")
    assert dev.cpu_model() == "aarch64"
    cpuinfo(None, platform_name="arm")  # no /proc/cpuinfo (macOS)
    assert dev.cpu_model() == "arm"
    cpuinfo(None)
    assert dev.cpu_model() is None


# ----------------------------------------------------------------------------- kinds
def test_a_record_that_names_no_device_ran_on_the_cpu():
    assert dev.record_device_kind({"cpu_model": "AMD EPYC"}) == "cpu:AMD EPYC"


def test_on_a_cuda_machine_the_cpu_is_still_the_cpus_kind(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(dev, "cpu_model", lambda: "AMD EPYC (family 25, model 17)")
    assert dev.device_kind("cuda:0") == "cuda:NVIDIA H100"
    assert dev.device_kind("cpu") == "cpu:AMD EPYC (family 25, model 17)"


def test_a_benchmark_without_a_machine_is_a_cpu_that_names_no_processor():
    assert dev.bench_device_kind({}) == "cpu"
    assert dev.bench_device_kind({"machine": {"gpu": None, "cpu_model": "Intel Xeon"}}) \
        == "cpu:Intel Xeon"


# ----------------------------------------------------------------------------- sync
def test_sync_waits_for_a_cuda_device_and_not_for_the_cpu(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    dev.sync(torch.device("cpu"))
    assert waited == []
    dev.sync(torch.device("cuda:1"))
    assert waited == [torch.device("cuda:1")]
