"""vit_fast.inference and vit_fast.capture_train_step (vit_fast/graphs.py).

On the CPU: the eager paths against the model / a hand-written loop, the argument checks, and
the graph bookkeeping (LRU of shapes, padding to captured batch sizes, static outputs, warm-up
and restore of the training step) through an injected capture function that stands in for
torch.cuda.graph: it runs the body at "capture" and again at each "replay", writing the results
into the static outputs in place, as a replayed graph does. The real captures: gpu-marked tests.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast import graphs


KERNEL_TESTS = ("test_inference_cpu_runs_the_model_eagerly", "test_train_step_cpu_matches_a_hand_written_loop[None]")


@pytest.fixture(autouse=True)
def _pytorch_path(request, monkeypatch):
    """The bookkeeping tests run the model's PyTorch path (fast on a CPU); the eager-equality tests
    and the GPU tests run the kernels (under the interpreter on a CPU)."""
    if "gpu" not in request.keywords and request.node.name not in KERNEL_TESTS:
        monkeypatch.setenv(vit_fast.dispatch.FORCE_TORCH_ENV, "1")


def tiny_vit(**kwargs):
    return vit_fast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=5, **kwargs)


class FakeGraph:
    """A stand-in for a captured CUDA graph: replay() reruns the body into the static outputs."""

    def __init__(self, body, before, output):
        self.body, self.before, self.output = body, before, output
        self.replays = 0

    def replay(self):
        self.replays += 1
        if self.before is not None:
            self.before()  # a replayed backward overwrites the grads; an eager one would accumulate
        new = self.body()
        with torch.no_grad():
            if isinstance(self.output, torch.Tensor):
                self.output.copy_(new)
            else:
                for o, n in zip(self.output, new):
                    o.copy_(n)


class FakeCapture:
    def __init__(self):
        self.calls = []

    def __call__(self, body, device, *, warmup=3, warmup_body=None, before_capture=None, **kwargs):
        self.calls.append(device)
        for _ in range(warmup):
            (warmup_body or body)()
        if before_capture is not None:
            before_capture()
        return FakeGraph(body, before_capture, body())


def fake_runner(model, **kwargs):
    return graphs.InferenceRunner(model, _capture=FakeCapture(), **kwargs)


# -- inference -------------------------------------------------------------------------------------


def test_inference_cpu_runs_the_model_eagerly():
    model = tiny_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    runner = vit_fast.inference(model)
    out = runner(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert runner.num_graphs == 0 and runner.captures == 0  # CPU tensors: no graphs
    assert not out.requires_grad
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)  # uint8 images, normalized inside
    with torch.no_grad():
        torch.testing.assert_close(runner(images), model(images), rtol=0, atol=0)


def test_inference_argument_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="training mode"):
        vit_fast.inference(model)  # not in eval mode
    model.eval()
    runner = vit_fast.inference(model)
    with pytest.raises(TypeError, match="expected a Tensor"):
        runner([torch.randn(1, 3, 32, 32)])
    with pytest.raises(ValueError, match="parameters are on cpu"):
        runner(torch.empty(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="0-dim"):
        runner(torch.tensor(1.0))
    model.train()
    with pytest.raises(RuntimeError, match="training mode after wrapping"):
        runner(torch.randn(1, 3, 32, 32))
    model.eval()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vit_fast.inference(lambda x: x)
    with pytest.raises(ValueError, match="max_shapes"):
        vit_fast.inference(model, max_shapes=0)
    with pytest.raises(ValueError, match="do not fit"):
        vit_fast.inference(model, batch_sizes=(1, 2, 4), max_shapes=2)
    with pytest.raises(ValueError, match="positive"):
        vit_fast.inference(model, batch_sizes=(0, 2))


def test_inference_lru_of_shapes():
    model = tiny_vit().eval()
    runner = fake_runner(model, max_shapes=2)
    xs = {b: torch.randn(b, 3, 32, 32) for b in (1, 2, 3)}
    for b in (1, 2, 1, 1):
        with torch.no_grad():
            torch.testing.assert_close(runner(xs[b]), model(xs[b]))
    assert runner.captures == 2  # a repeated shape replays
    keys = [k[0][0] for k in runner._graphs]
    assert keys == [2, 1]  # least recently used first
    runner(xs[3])  # a third shape evicts the least recently used (batch 2)
    assert runner.captures == 3 and [k[0][0] for k in runner._graphs] == [1, 3]
    runner(xs[2])  # batch 2 again: captured again, evicting batch 1
    assert runner.captures == 4 and [k[0][0] for k in runner._graphs] == [3, 2]
    replays = {k[0][0]: e[1].replays for k, e in runner._graphs.items()}
    assert replays == {3: 1, 2: 1}
    runner(xs[3].double().float())  # same shape and dtype, another tensor: replays
    assert runner.captures == 4
    runner(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))  # another dtype is another graph
    assert runner.captures == 5 and runner.num_graphs == 2
    runner.reset()
    assert runner.num_graphs == 0


def test_inference_replay_uses_the_new_input():
    model = tiny_vit().eval()
    runner = fake_runner(model)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out_a, out_b = runner(a), runner(b)
    with torch.no_grad():
        torch.testing.assert_close(out_a, model(a))
        torch.testing.assert_close(out_b, model(b))
    assert runner.captures == 1
    assert out_a.data_ptr() != out_b.data_ptr()  # clone=True: each call its own tensor


def test_inference_clone_false_returns_the_static_output():
    model = tiny_vit().eval()
    runner = fake_runner(model, clone=False)
    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out_a = runner(a)
    ptr = out_a.data_ptr()
    out_b = runner(b)
    assert out_b.data_ptr() == ptr  # the same buffer, overwritten by the next call
    with torch.no_grad():
        torch.testing.assert_close(out_b, model(b))
        torch.testing.assert_close(out_a, model(b))  # documented: a's result is gone


def test_inference_pads_to_captured_batch_sizes():
    model = tiny_vit().eval()
    runner = fake_runner(model, batch_sizes=(4, 2))
    runner.prepare(torch.randn(1, 3, 32, 32))
    assert runner.captures == 2 and [k[0][0] for k in runner._graphs] == [4, 2]  # largest first
    for b in (1, 2, 3, 4):
        x = torch.randn(b, 3, 32, 32)
        out = runner(x)
        assert out.shape == (b, 5)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x))
    assert runner.captures == 2  # every batch up to 4 reused the two graphs
    x = torch.randn(5, 3, 32, 32)  # larger than any: a graph of its own
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x))
    assert runner.captures == 3


def test_inference_recaptures_when_weights_are_replaced():
    model = tiny_vit().eval()
    runner = fake_runner(model)
    x = torch.randn(2, 3, 32, 32)
    runner(x)
    with torch.no_grad():  # in place: the graph sees the new values, no recapture
        model.head.bias.add_(1.0)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x))
    assert runner.captures == 1
    model.half()  # new parameter tensors: the old graphs are dropped
    out = runner(x.half())
    assert runner.captures == 2 and runner.num_graphs == 1
    with torch.no_grad():
        torch.testing.assert_close(out, model(x.half()))


def test_inference_disabled_runs_eagerly():
    model = tiny_vit().eval()
    runner = graphs.InferenceRunner(model, enabled=False, _capture=FakeCapture())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=0)
    assert runner.captures == 0
    assert runner.prepare(x) is runner and runner.captures == 0


# -- training step ---------------------------------------------------------------------------------


def _data(steps=3, batch=4, classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(steps)]


def _hand_loop(model, optimizer, data, amp_dtype=None):
    losses = []
    for x, y in data:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_train_step_cpu_matches_a_hand_written_loop(amp_dtype):
    # None: the kernels under the interpreter; bf16 on the PyTorch path (the interpreter refuses bf16 dots)
    model = tiny_vit()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    data = _data()
    step = vit_fast.capture_train_step(model, opt, F.cross_entropy, *data[0], amp_dtype=amp_dtype)
    assert not step.graphed
    _assert_same_params(model, ref, rtol=0, atol=0)  # building the eager step changes nothing
    losses = [step(x, y) for x, y in data]
    ref_losses = _hand_loop(ref, ref_opt, data, amp_dtype)
    _assert_same_params(model, ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=0, atol=0)
    assert losses[0].dim() == 0 and not losses[0].requires_grad


def test_train_step_graph_path_checks_the_optimizer():
    model = tiny_vit()
    x, y = _data(1)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # capturable=False
    # on the CPU the eager step needs nothing of the optimizer
    assert not vit_fast.capture_train_step(model, opt, F.cross_entropy, x, y).graphed
    # the graph path (CUDA, here forced by the injected capture) refuses it, before any warm-up
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="capturable=True"):
        graphs.TrainStep(model, opt, F.cross_entropy, x, y, _capture=FakeCapture())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    graphs.check_capturable(torch.optim.SGD(model.parameters(), lr=0.1))  # no such option: passes
    opt.param_groups[0]["capturable"] = True
    graphs.check_capturable(opt)


def test_train_step_argument_errors():
    model = tiny_vit()
    x, y = _data(1)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="Tensor"):
        vit_fast.capture_train_step(model, opt, F.cross_entropy, x.tolist(), y)
    with pytest.raises(TypeError, match="Optimizer"):
        vit_fast.capture_train_step(model, None, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match="parameters are on cpu"):
        vit_fast.capture_train_step(model, opt, F.cross_entropy, x.to("meta"), y)
    step = graphs.TrainStep(model, opt, F.cross_entropy, x, y, _capture=FakeCapture())
    with pytest.raises(ValueError, match="differ from the captured"):
        step(x[:2], y[:2])
    with pytest.raises(TypeError, match="Tensor"):
        step(x, y.tolist())


def test_train_step_graph_orchestration_matches_eager():
    """Warm-up, restore and replay through the fake capture: 3 steps land where 3 eager steps do."""
    model = tiny_vit()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    data = _data()
    fake = FakeCapture()
    step = graphs.TrainStep(model, opt, F.cross_entropy, *data[1], warmup=3, _capture=fake)
    assert step.graphed and len(fake.calls) == 1
    _assert_same_params(model, ref, rtol=0, atol=0)  # the 3 warm-up steps and the capture were undone
    for buf in (s["momentum_buffer"] for s in opt.state.values()):
        assert torch.count_nonzero(buf) == 0
    losses = [step(x, y) for x, y in data]
    ref_losses = _hand_loop(ref, ref_opt, data)
    _assert_same_params(model, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-6)
    assert step._captured.replays == 3


def test_restore_gives_back_a_fresh_adam():
    """Zeroing the state the warm-up created is a fresh Adam's first step (step 0, zero moments)."""
    model = tiny_vit()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, amsgrad=True)
    data = _data(4)
    snapshot = graphs._snapshot(model, opt)
    _hand_loop(model, opt, data[:3])  # what warm-up does
    graphs._restore(model, opt, snapshot)
    _assert_same_params(model, ref, rtol=0, atol=0)
    _hand_loop(model, opt, data[3:])
    _hand_loop(ref, ref_opt, data[3:])
    _assert_same_params(model, ref, rtol=0, atol=0)
    # restoring a state that existed before the warm-up puts its values back
    snapshot = graphs._snapshot(model, opt)
    _hand_loop(model, opt, data[:2])
    graphs._restore(model, opt, snapshot)
    _hand_loop(model, opt, data[3:])
    _hand_loop(ref, ref_opt, data[3:])
    _assert_same_params(model, ref, rtol=0, atol=0)


def test_restore_warns_for_unknown_optimizer_state():
    model = tiny_vit()
    opt = torch.optim.Rprop(model.parameters())  # its fresh state is not all zeros
    snapshot = graphs._snapshot(model, opt)
    _hand_loop(model, opt, _data(1))
    with pytest.warns(UserWarning, match="reset to zeros"):
        graphs._restore(model, opt, snapshot)


# -- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_inference_graph_replay_matches_eager_cuda():
    model = tiny_vit().cuda().eval().half()
    runner = vit_fast.inference(model)
    for b in (1, 8):
        x = torch.randn(b, 3, 32, 32, device="cuda", dtype=torch.half)
        with torch.no_grad():
            expected = model(x)
        tol = dict(rtol=1e-3, atol=1e-3)  # the same kernels; cuBLAS may pick other algorithms under capture
        torch.testing.assert_close(runner(x), expected, **tol)
        captures = runner.captures
        y = torch.randn_like(x)
        with torch.no_grad():
            expected = model(y)
        torch.testing.assert_close(runner(y), expected, **tol)  # replay on new data
        assert runner.captures == captures  # the same shape again: no new capture
    assert runner.captures == 2 and runner.num_graphs == 2
    padded = vit_fast.inference(model, batch_sizes=(8,))
    x = torch.randn(3, 3, 32, 32, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(padded(x), expected, rtol=2e-3, atol=2e-3)  # batch 3 run padded to 8


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_captured_train_step_matches_eager_cuda(amp_dtype):
    torch.manual_seed(0)
    model = tiny_vit().cuda()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, capturable=True)
    data = [(x.cuda(), y.cuda()) for x, y in _data()]
    step = vit_fast.capture_train_step(model, opt, F.cross_entropy, *data[0], amp_dtype=amp_dtype)
    eager = vit_fast.capture_train_step(ref, ref_opt, F.cross_entropy, *data[0], amp_dtype=amp_dtype, enabled=False)
    assert step.graphed and not eager.graphed
    _assert_same_params(model, ref, rtol=0, atol=0)  # warm-up undone
    losses = [step(x, y) for x, y in data]
    ref_losses = [eager(x, y) for x, y in data]
    tol = dict(rtol=1e-4, atol=1e-5) if amp_dtype is None else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **tol)
    _assert_same_params(model, ref, **tol)
    with pytest.raises(ValueError, match="capturable=True"):
        vit_fast.capture_train_step(ref, torch.optim.AdamW(ref.parameters()), F.cross_entropy, *data[0])
