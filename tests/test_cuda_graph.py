"""The GPU path every CIFAR result trains through, against the eager step it stands for: forward, backward and
the optimizer step captured as one CUDA graph (common.make_train_step), and the batched HierNet on channels-last
CUDA tensors. CUDA only: CI (CPU) skips this file; on a GPU, `python -m pytest -q tests/test_cuda_graph.py`."""

import copy

import pytest
import torch

import common
import hdl_stack
from test_hiernet import make_model  # the per-branch tree and its batched form

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_kernels():
    """fp32 products without TF32 and deterministic cuDNN, so that two forms of one step can agree to rounding."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    ) = saved


def train(model, loss_fn, make_optimizer, batches, lrs, cuda_graph, dtype):
    """A copy of model after one step per batch at the given learning rates, and the steps' summed statistics
    (summed as train_epoch does: each step's tensors are read before the next step reuses them)."""
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model.parameters())
    step = common.make_train_step(model, loss_fn, optimizer, device=CUDA, dtype=dtype, cuda_graph=cuda_graph)
    sums = {}
    for (x, y), lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, value in step(x, y).items():
            sums[name] = sums[name] + value.double() if name in sums else value.double().clone()
    torch.cuda.synchronize()
    return model, {name: value.item() for name, value in sums.items()}


def assert_same_training(model, loss_fn, make_optimizer, batches, dtype, after=lambda model: None):
    """Graphed and eager training end with the same weights, buffers (BatchNorm statistics, centres) and
    statistics. 14 steps: 3 eager warm-up steps, a capture, replays, and a learning-rate change at step 9
    that forces a second capture (the rate is baked into the graph)."""
    lrs = [0.05] * 9 + [0.005] * (len(batches) - 9)
    graphed, graphed_stats = train(model, loss_fn, make_optimizer, batches, lrs, cuda_graph=True, dtype=dtype)
    eager, eager_stats = train(model, loss_fn, make_optimizer, batches, lrs, cuda_graph=False, dtype=dtype)
    after(graphed), after(eager)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "fp32" else {"rtol": 1e-2, "atol": 1e-3}
    eager_state = eager.state_dict()
    for name, value in graphed.state_dict().items():
        torch.testing.assert_close(value, eager_state[name], msg=name, **tol)
    assert graphed_stats.keys() == eager_stats.keys()
    for name in eager_stats:
        assert graphed_stats[name] == pytest.approx(eager_stats[name], rel=1e-3, abs=1e-3), name
    # The run moved the weights: a graph that replayed nothing would fail above only by luck.
    first = next(iter(model.state_dict()))
    assert not torch.allclose(graphed.state_dict()[first], model.state_dict()[first].to(CUDA))


def image_batches(n_classes, steps=14, batch=16, size=16, levels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size, generator=g).to(CUDA, memory_format=torch.channels_last)
        y = torch.randint(0, n_classes, (batch,), generator=g)
        labels = y.to(CUDA) if levels is None else tuple(torch.as_tensor(m)[y].to(CUDA) for m in levels)
        batches.append((x, labels))
    return batches


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graphed_sgd_step_trains_the_cifar_resnet_as_the_eager_step(dtype):
    torch.manual_seed(0)
    model = common.to_device_model(common.CifarResNet(1, 10), CUDA)
    make_sgd = lambda params: common.make_sgd(params, 0.05, momentum=0.9, weight_decay=5e-4)
    assert_same_training(model, common.cross_entropy_loss, make_sgd, image_batches(10), dtype)


@pytest.mark.parametrize("center_update", ["epoch", "wen"])
def test_graphed_adam_step_trains_hdl_and_moves_its_centres_as_the_eager_step(center_update):
    """HDL's loss writes the centre sums (or the centres) in place inside the graph; Adam is the fused,
    capturable form that make_adam gives on CUDA."""
    torch.manual_seed(0)
    fine_to_coarse = [0, 0, 1, 1, 2, 2]
    model = hdl_stack.HDLNet(common.CifarResNet(1, 6), 6, [3], [None])
    model = common.to_device_model(model, CUDA)
    loss_fn = hdl_stack.make_hdl_loss_fn(1.0, 1.0, [1.0], center_update=center_update, center_alpha=0.5)
    make_adam = lambda params: common.make_adam(params, 1e-3, device=CUDA)
    batches = image_batches(6, levels=[list(range(6)), fine_to_coarse])
    after = lambda m: hdl_stack.end_of_epoch_centers(m, center_update, 1.0)
    assert_same_training(model, loss_fn, make_adam, batches, "fp32", after=after)


@torch.no_grad()
def test_batched_hiernet_on_channels_last_cuda_gives_the_per_branch_log_probs():
    """The batched HierNet's grouped convolutions and gathers on channels-last CUDA tensors (the training
    layout) against the per-branch tree on the CPU; fast evaluation as Algorithm 1."""
    _, reference, batched = make_model()  # a two-level tree on a backbone with trained-like BatchNorm
    model = common.to_device_model(copy.deepcopy(batched), CUDA).eval()
    x = torch.randn(24, 3, 16, 16)
    log_p = model(x.to(CUDA, memory_format=torch.channels_last)).cpu()
    torch.testing.assert_close(log_p, reference(x), rtol=1e-4, atol=1e-4)
    routed = model.route_all(x.to(CUDA, memory_format=torch.channels_last)).cpu()
    assert torch.equal(routed.round().long(), reference.route(x))
