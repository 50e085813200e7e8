"""The peaks MFU is measured against: the GPU found by its name, the column by the run's precision."""

from phased_dmd_mega.flops import matmul_precision, peak_tflops


def test_the_peak_is_the_named_gpus_for_the_runs_precision():
    assert peak_tflops("bfloat16", "NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("bfloat16", "NVIDIA H100 PCIe") == 756.5  # not the SXM figure
    assert peak_tflops("fp8", "NVIDIA H200") == 1978.9
    assert peak_tflops("fp8", "NVIDIA A100-SXM4-80GB") is None  # no FP8 on A100
    assert peak_tflops("bfloat16", "Some Other GPU") is None


def test_the_precision_follows_dtype_tf32_and_fp8():
    assert matmul_precision("bfloat16", tf32=True, fp8=False) == "bfloat16"
    assert matmul_precision("float32", tf32=True, fp8=False) == "tf32"
    assert matmul_precision("float32", tf32=False, fp8=False) == "float32"
    assert matmul_precision("bfloat16", tf32=True, fp8=True) == "fp8"
