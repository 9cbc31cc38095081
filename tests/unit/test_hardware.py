"""The hardware database loads, and bad cluster files fail with ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from galvatron.strategies.hardware import gpu_names, load_cluster, load_gpu

from galvatron.errors import ConfigError
from galvatron.paths import config_root, presets


@pytest.mark.parametrize("name", gpu_names())
def test_every_gpu_loads_with_sane_numbers(name: str) -> None:
    gpu = load_gpu(name)
    assert gpu.peak_flops("bf16") >= 100e12
    assert 0 < gpu.matmul_efficiency <= 1 and 0 < gpu.memory_efficiency <= 1
    assert gpu.memory_gib > gpu.reserved_gib


@pytest.mark.parametrize("name", presets("clusters"))
def test_every_cluster_preset_loads(name: str) -> None:
    cluster = load_cluster(name)
    assert cluster.world_size == cluster.gpus_per_node * cluster.nodes
    assert cluster.intra.busbw > cluster.inter_link_per_gpu.busbw


def test_required_gpus_are_in_the_database() -> None:
    required = {"A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "B200", "L40S", "MI300X"}
    assert required <= set(gpu_names())


def test_overrides_replace_keys() -> None:
    cluster = load_cluster("8xH100", nodes=4, inter_node_gbps=25)
    assert cluster.world_size == 32
    assert cluster.inter.gbps == 25


def test_fp8_on_a100_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fp8"):
        load_gpu("A100-80GB").peak_flops("fp8")


@pytest.mark.parametrize("bad", [
    {"gpu": "A100-80GB", "gpus_per_node": 8},
    {"gpu": "Z9", "gpus_per_node": 8, "nodes": 1},
    {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 0},
    {"gpu": "H100-SXM", "gpus_per_node": 8, "nodes": 1, "colour": "red"},
])
def test_bad_clusters_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError):
        load_cluster(bad)


def test_attention_efficiency_by_kernel_and_head_dim() -> None:
    h100 = load_gpu("H100-SXM")
    assert h100.attention_kernel == "cudnn"
    cudnn_128, cudnn_64 = h100.attention_efficiency(False, 128), h100.attention_efficiency(False, 64)
    assert cudnn_64 < h100.attention_efficiency(False, 96) < cudnn_128  # linear between measured head dims
    assert h100.attention_efficiency(False, 256) == cudnn_128  # flat outside
    assert h100.attention_efficiency(True, 128, "flash2") < 0.7 * h100.attention_efficiency(True, 128)
    with pytest.raises(ConfigError, match="no attention kernel 'flash9'"):
        h100.attention_efficiency(False, 128, "flash9")
    # the step's rate: the burst-rate entry times the measured in-step fraction
    assert 0 < h100.attention_in_step < 1
    assert cudnn_128 == pytest.approx(h100.attention_kernels["cudnn"]["forward"][128] * h100.attention_in_step)


def test_bad_attention_kernels_raise_config_error(tmp_path: Path) -> None:
    data = yaml.safe_load((config_root() / "hardware" / "A100-80GB.yaml").read_text())
    for bad, match in ((dict(data, attention_kernels={"flash2": {"forward": 1.5, "backward": 0.6}}), "fraction"),
                       (dict(data, attention_kernel="cudnn"), "not in attention_kernels"),
                       (dict(data, attention_in_step=1.2), "attention_in_step")):
        path = tmp_path / "gpu.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=match):
            load_gpu(str(path))


@pytest.mark.parametrize(("device", "entry"), [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"),  # the same memory as the PCIe card: the name must decide
    ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("NVIDIA B200", "B200"),
])
def test_gpu_for_device_names_the_form_factor(device: str, entry: str) -> None:
    from galvatron.strategies.hardware import gpu_for_device, load_gpu

    assert gpu_for_device(device) == entry
    assert load_gpu(entry).name == entry


def test_gpu_for_unknown_device_says_what_the_database_has() -> None:
    from galvatron.strategies.hardware import gpu_for_device

    with pytest.raises(ConfigError, match=r"not in the hardware database.*H100-SXM"):
        gpu_for_device("NVIDIA GeForce RTX 4090")
