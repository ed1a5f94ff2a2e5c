"""How far ssl_jax's training step and PyTorch's float32 one are from PyTorch's float64 one, for lightly's benchmark
models of tests/test_lightly_parity.py (its CASES, at its batch and seeds).

Two steps as that test takes them: torch loaded from our state before each; then, per step, the largest relative
L2 distance over the trained leaves of SGD's momentum buffer (gradient + weight decay + 0.9 x the last buffer)
between ours and float64 torch's, and between float32 torch's and float64 torch's. A method whose own float32
error is far above torch's has a numerical weakness (in 2026-11 that was BatchNorm's one-pass variance).

usage: python benchmarks/parity_vs_float64.py [CASE ...]   (from the repository root; default all CASES)
"""
import copy
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path[:0] = [os.path.join(os.getcwd(), "tests"), os.getcwd()]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets them
jax.config.update("jax_default_prng_impl", "rbg")

import harness  # noqa: E402
import test_lightly_parity as parity  # noqa: E402
from ssl_jax import config as config_lib, parallel, train  # noqa: E402


def distances(case):
    """Yields (step, leaf, ours vs float64, torch float32 vs float64) of the leaf farthest from float64."""
    method, overrides, model, lr, zero = parity.CASES[case]
    config = config_lib.load_config(f"configs/{method}.py:cifar10", [
        "model.dtype=float32", f"batch_size={parity.BATCH}", *overrides])
    source = harness.random_source(n=4 * parity.BATCH, size=32)
    setup = train.build(config, source)
    state = train.initial_state(setup)
    net = model().train()
    lr_at = lr if callable(lr) else (lambda step: lr)  # noqa: E731
    opt = net.optimizer(lr_at(0))
    if not isinstance(opt, torch.optim.SGD):
        return
    params = {k: p for k, p in net.named_parameters() if p.requires_grad}
    rs = np.random.RandomState(0)
    labels = np.arange(parity.BATCH, dtype=np.int32) % source.num_classes
    for step in range(net.STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        parity.load(net, opt, jax.device_get(state), target=step == 0)
        net64 = copy.deepcopy(net).double()
        for module in net64.modules():  # plain tensor attributes too (MoCo's queue)
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    setattr(module, name, value.double())
        last = {k: opt.state[p]["momentum_buffer"].numpy().astype(np.float64) if "momentum_buffer" in opt.state[p]
                else 0.0 for k, p in params.items()}
        v1 = rs.randn(parity.BATCH, 32, 32, 3).astype(np.float32)
        v2 = (1.5 * rs.randn(parity.BATCH, 32, 32, 3) + 0.3).astype(np.float32)
        state, _ = setup.views_step_fn(state, parallel.put_batch((v1, v2), setup.mesh),
                                       parallel.put_batch(labels, setup.mesh))
        ours = parity.buffers(net, opt, jax.device_get(state))
        x0, x1 = (torch.from_numpy(v[net.ORDER].transpose(0, 3, 1, 2).copy()) for v in (v1, v2))
        opt.zero_grad()
        net.loss(x0, x1).backward()
        opt.step()
        net.step_end()
        net64.loss(x0.double(), x1.double()).backward()
        p64 = dict(net64.named_parameters())
        ours_worst, theirs_worst = (0.0, ""), 0.0
        for k, p in params.items():
            want = p64[k].grad.numpy() + 5e-4 * p64[k].detach().numpy() + 0.9 * last[k]
            if k in zero or not np.any(want):
                continue
            size = np.linalg.norm(want)
            got = np.asarray(ours["momentum_buffer", k], np.float64)
            theirs = opt.state[p]["momentum_buffer"].numpy().astype(np.float64)
            ours_worst = max(ours_worst, (float(np.linalg.norm(got - want) / size), k))
            theirs_worst = max(theirs_worst, float(np.linalg.norm(theirs - want) / size))
        yield step, ours_worst[1], ours_worst[0], theirs_worst


if __name__ == "__main__":
    for case in sys.argv[1:] or sorted(parity.CASES):
        for step, leaf, ours, theirs in distances(case):
            print(f"{case:14s} step {step}: ours {ours:.3%} from float64 (farthest leaf {leaf}); "
                  f"torch float32 at most {theirs:.3%}", flush=True)
