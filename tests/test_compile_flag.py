"""--compile reaches every train step and compiles the model the step trains.

torch.compile itself takes minutes on a busy CPU, so it is replaced here by a stand-in that
records what it was given; the GPU runs exercise the real one."""

import ast
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent.parent
TRAINING_SCRIPTS = ["hiernet.py", "coarse_outer_product.py", "merged_resnet.py", "latent_string.py", "hdl_stack.py"]


def make_train_step_calls(script):
    tree = ast.parse((ROOT / script).read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "make_train_step"
    ]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_train_step_gets_the_compile_flag(script):
    calls = make_train_step_calls(script)
    assert calls, f"{script} builds no train step"
    for call in calls:
        given = {k.arg: ast.unparse(k.value) for k in call.keywords}
        assert given.get("compile") == "args.compile", f"{script}:{call.lineno} does not pass compile=args.compile"


class Recorded(torch.nn.Module):
    """What the stand-in torch.compile returns: the same module, marked as compiled."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("compile", [False, True])
def test_compile_wraps_the_model_the_step_trains(compile, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or Recorded(m))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    seen = []

    def loss_fn(m, x, y):
        seen.append(m)
        return common.cross_entropy_loss(m, x, y)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = common.make_train_step(model, loss_fn, optimizer, device="cpu", compile=compile)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    losses = [float(step(x, y)["loss"]) for _ in range(5)]
    assert compiled == ([model] if compile else [])
    assert all(isinstance(m, Recorded) == compile for m in seen) and len(seen) == 5
    assert not torch.equal(model.weight, before)  # the step trains the original parameters
    assert losses[-1] < losses[0]


def test_regional_compilation_compiles_each_outermost_block_in_place(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    monkeypatch.setattr(torch, "compile", lambda m: pytest.fail("regional compilation wrapped the whole model"))
    model = common.CifarResNet(1, 10)  # three residual blocks
    blocks = [m for m in model.modules() if isinstance(m, common.CifarBasicBlock)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = common.make_train_step(
        model, common.cross_entropy_loss, optimizer, device="cpu", compile=(common.CifarBasicBlock,)
    )
    assert compiled == blocks and len(blocks) == 3
    before = model.stem[0].weight.detach().clone()
    stats = step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(stats["loss"]) and not torch.equal(model.stem[0].weight, before)
    # Blocks inside a compiled block are not compiled again; a model without the blocks is refused.
    compiled.clear()
    outer = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2))
    assert common.compile_blocks(outer, (torch.nn.Sequential,)) == 1 and compiled == [outer]
    with pytest.raises(SystemExit, match="no CifarBasicBlock"):
        common.compile_blocks(torch.nn.Linear(2, 2), (common.CifarBasicBlock,))


def test_hdl_compiles_its_loss_with_the_model_and_steps_as_eagerly(monkeypatch):
    """hdl_stack.py's --compile: the model and eq. 5's loss are one compiled function, traced by dynamo in one
    graph (no break), whose steps train the same weights and sum the same centre statistics as the eager
    step. Dynamo traces for real here; its eager backend stands in for inductor (minutes on a CPU)."""
    import hdl_stack

    call = next(c for c in make_train_step_calls("hdl_stack.py"))
    assert {k.arg: ast.unparse(k.value) for k in call.keywords}.get("compile_loss") == "True"

    real_compile, compiled = torch.compile, []

    def eager_backend(fn):
        compiled.append(fn)
        return real_compile(fn, backend="eager", fullgraph=True)  # fullgraph: a graph break fails the test

    def train(compile):
        torch.manual_seed(0)
        backbone = hdl_stack.ResNet18(10, stem="cifar")
        model = hdl_stack.HDLNet(backbone, 10, [4, 2], [8, 3], heads="cascade", fine_head=True)
        loss_fn = hdl_stack.make_hdl_loss_fn(1.0, 1.0, [1.0, 1.0])
        optimizer = common.make_adam(model.parameters(), 0.001, device=torch.device("cpu"))
        step = common.make_train_step(
            model, loss_fn, optimizer, device="cpu", dtype="fp32", compile=compile, compile_loss=True
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, fine = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)
            stats = step(x, (fine, fine % 4, fine % 2))
        return model, stats

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", eager_backend)
    compiled_model, compiled_stats = train(True)
    assert len(compiled) == 1 and not isinstance(compiled[0], torch.nn.Module)  # the function, not the model
    eager_model, eager_stats = train(False)
    assert len(compiled) == 1
    for (name, a), b in zip(compiled_model.state_dict().items(), eager_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert compiled_model.center_count.sum() == 18  # three batches of six summed for the epoch's centres
    for key in eager_stats:
        torch.testing.assert_close(compiled_stats[key], eager_stats[key], rtol=1e-5, atol=1e-6)
