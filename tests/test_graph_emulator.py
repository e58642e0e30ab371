"""The CPU emulation of CUDA graph capture and replay (tests/graph_emulator.py) behaves as a
CUDA graph does in the ways the replayed-step tests rely on."""
import pytest
import torch
from torch import nn

from graph_emulator import CaptureError, emulated_capture


def _bn_step(bn: nn.BatchNorm1d, x: torch.Tensor, out: dict) -> None:
    y = bn(x)
    loss = (y * y).mean()
    loss.backward()
    out["loss"] = loss.detach()


def test_replays_equal_eager_calls_and_the_capture_itself_changes_nothing():
    torch.manual_seed(0)
    batches = [torch.randn(8, 4) for _ in range(3)]
    eager, graphed = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    graphed.load_state_dict(eager.state_dict())
    static_x, out = batches[0].clone(), {}
    replay = emulated_capture(lambda: _bn_step(graphed, static_x, out))
    # nothing ran: the running statistics and the batch counter are as before
    assert torch.equal(graphed.running_mean, torch.zeros(4))
    assert int(graphed.num_batches_tracked) == 0
    grads = graphed.weight.grad  # the graph's gradient memory
    for x in batches:
        eager.weight.grad = None
        eager_out = {}
        _bn_step(eager, x, eager_out)
        static_x.copy_(x)
        replay()
        assert torch.equal(out["loss"], eager_out["loss"])
        assert graphed.weight.grad is grads and torch.equal(grads, eager.weight.grad)
    for name, value in eager.state_dict().items():
        assert torch.equal(graphed.state_dict()[name], value), name


def test_a_python_value_read_inside_is_frozen_at_the_capture():
    state, x, out = {"lr": 0.5}, torch.ones(3), torch.zeros(3)
    replay = emulated_capture(lambda: out.copy_(x * state["lr"]))
    state["lr"] = 0.25
    replay()
    assert torch.equal(out, torch.full((3,), 0.5))  # what a CUDA graph does too


def test_a_tensor_replaced_outside_is_not_the_one_the_graph_writes():
    holder = {"t": torch.zeros(2)}
    x = torch.ones(2)
    replay = emulated_capture(lambda: holder.__setitem__("t", x + 1))
    captured = holder["t"]
    holder["t"] = torch.zeros(2)
    x.fill_(5)
    replay()
    assert torch.equal(captured, torch.full((2,), 6.0)) and torch.equal(holder["t"], torch.zeros(2))


def test_a_tensor_given_other_memory_after_the_capture_is_refused():
    w, x = nn.Parameter(torch.ones(2)), torch.ones(2)
    replay = emulated_capture(lambda: (w * x).sum().backward())
    replay()
    w.data = torch.zeros(2)
    with pytest.raises(CaptureError, match="other memory"):
        replay()


@pytest.mark.parametrize("body", [
    lambda x: x.sum().item(),
    lambda x: bool(x.sum() > 0),
    lambda x: x.nonzero(),
    lambda x: x + torch.tensor([1.0, 2.0]),
], ids=["item", "bool", "nonzero", "host-data"])
def test_what_a_capture_refuses_raises(body):
    x = torch.ones(2)
    with pytest.raises(CaptureError):
        emulated_capture(lambda: body(x))


def test_random_numbers_are_drawn_by_the_replays_not_the_capture():
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    out = torch.empty(4)
    replay = emulated_capture(lambda: out.copy_(torch.rand(4)))
    replay()
    assert torch.equal(out, expected)
