"""The megatron-core CPU compatibility layer: needed without it, working with it, absent on CUDA.

Each check runs in a fresh interpreter, because the layer patches process-wide state.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer exists for CPU-only machines")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_megatron_rng_seeding_fails_on_cpu_without_the_layer():
    # If megatron-core ever stops needing CUDA here, this tells us the layer can shrink.
    result = _python(
        """
        import torch.distributed as dist
        from megatron.core import parallel_state, tensor_parallel
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(0)
        except (AssertionError, RuntimeError) as err:
            print("FAILED:", err)
        """
    )
    assert "FAILED: Torch not compiled with CUDA enabled" in result.stdout, result.stderr


def test_layer_redirects_exactly_the_listed_calls_and_megatron_works():
    result = _python(
        """
        import torch
        import torch.distributed as dist
        from phased_dmd_mega.parallel import cpu_compat
        from megatron.core import parallel_state, tensor_parallel
        assert cpu_compat.apply() and cpu_compat.is_applied() and cpu_compat.apply()
        print(sorted(cpu_compat.PATCHES))
        assert torch.cuda.current_device() == torch.device("cpu")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        tensor_parallel.model_parallel_cuda_manual_seed(11)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            inside = torch.randn(3)
        assert torch.equal(before, torch.get_rng_state()), "fork must restore the outer state"
        with tracker.fork():
            second = torch.randn(3)
        assert not torch.equal(inside, second), "the tracked state must advance"
        # Sequence-parallel communication buffers come from this, on torch.cuda.current_device().
        from megatron.core.utils import GlobalMemoryBuffer
        out = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "sp")
        print("OK", tuple(out.shape), out.device)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "OK (2, 3) cpu" in result.stdout
    assert (
        "['megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32', "
        "'megatron.core.optimizer.clip_grads.get_grad_norm_fp32', "
        "'megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__', "
        "'megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32', "
        "'megatron.core.optimizer.optimizer.get_grad_norm_fp32', "
        "'megatron.core.tensor_parallel.random._get_cuda_rng_state', "
        "'megatron.core.tensor_parallel.random._set_cuda_rng_state', 'torch.cuda.current_device', "
        "'torch.cuda.get_rng_state', 'torch.cuda.manual_seed', 'torch.cuda.set_rng_state', "
        "'torch.cuda.synchronize']"
    ) in result.stdout


_DISTRIBUTED_OPTIMIZER_ON_A_LINEAR = """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    {setup}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(TransformerConfig(num_layers=1, hidden_size=1, num_attention_heads=1),
                                  DistributedDataParallelConfig(use_distributed_optimizer=True), model)
    config = OptimizerConfig(optimizer="adam", lr=0.1, weight_decay=0.0, use_distributed_optimizer=True)
    try:
        optimizer = get_megatron_optimizer(config, [ddp], config_overrides={{}}, use_gloo_process_groups=False)
    except (AssertionError, RuntimeError, TypeError) as err:
        print("FAILED:", err)
        raise SystemExit(0)
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    ddp.finish_grad_sync()
    ok, norm, _ = optimizer.step()
    adam = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.0)
    reference(x).square().sum().backward()
    adam.step()
    assert ok and norm > 0
    torch.testing.assert_close(model.weight, reference.weight)
    # Outside megatron's optimizer functions nothing changed.
    assert model.weight.type() == "torch.FloatTensor"
    try:
        torch.zeros(1, device="cuda")
    except (AssertionError, RuntimeError):
        print("OK: megatron's distributed optimizer stepped like AdamW")
"""


def test_megatron_distributed_optimizer_fails_on_cpu_without_the_layer():
    setup = """
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    torch.cuda.current_device = lambda: torch.device("cpu")  # the layer's older redirection only
    """
    result = _python(_DISTRIBUTED_OPTIMIZER_ON_A_LINEAR.format(setup=textwrap.indent(textwrap.dedent(setup), "    ")))
    assert "FAILED: Torch not compiled with CUDA enabled" in result.stdout, result.stdout + result.stderr


def test_megatron_distributed_optimizer_steps_on_cpu_with_the_layer():
    setup = """
    from phased_dmd_mega.parallel import cpu_compat
    cpu_compat.apply()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    """
    result = _python(_DISTRIBUTED_OPTIMIZER_ON_A_LINEAR.format(setup=textwrap.indent(textwrap.dedent(setup), "    ")))
    assert result.returncode == 0, result.stderr
    assert "OK: megatron's distributed optimizer stepped like AdamW" in result.stdout, result.stdout + result.stderr


def test_layer_is_a_no_op_where_cuda_exists():
    result = _python(
        """
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.cuda.current_device
        from phased_dmd_mega.parallel import cpu_compat
        assert cpu_compat.apply() is False and not cpu_compat.is_applied() and not cpu_compat.PATCHES
        assert torch.cuda.current_device is original
        print("OK")
        """
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
