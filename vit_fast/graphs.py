"""Whole-model CUDA graphs: an inference runner and a captured training step.

A ViT forward on a GPU is a few hundred kernel launches; at small batches the host cannot issue
them as fast as the GPU runs them, and the GPU idles between launches. Capturing the forward (or
a whole training step) in a CUDA graph replaces those launches with one.

    runner = vit_fast.inference(model.cuda().eval().half())
    logits = runner(images)                    # first call per shape captures, later calls replay

    step = vit_fast.capture_train_step(model, optimizer, loss_fn, images, labels, amp_dtype=torch.bfloat16)
    loss = step(images, labels)                # forward + backward + optimizer.step, one replay

Both follow PyTorch's documented recipe (``torch.cuda.graph``): warm-up iterations on a side
stream before capture, static input buffers that each call copies into, and for training the
gradients set to None before capture, so the captured backward allocates them from the graph's
private pool and each replay refills them in place. On CPU tensors (and with ``enabled=False``)
both run eagerly with the same signature and results.

What a graph fixes at capture time, and so what these wrappers require:
- the shapes and dtypes of the inputs (the runner keeps one graph per input shape; the training
  step takes only its sample's shape);
- the addresses of the weights: in-place changes (``load_state_dict``, optimizer steps) are
  seen by later replays; replacing them (``model.half()``, ``.to()``, assigning new Parameters)
  is not. The runner notices when the first parameter moved and recaptures; anything subtler
  needs ``runner.reset()``;
- host-side values: a float learning rate is baked into a captured ``optimizer.step``. To
  schedule it, build the optimizer with a tensor ``lr`` (``lr=torch.tensor(1e-3, device="cuda")``),
  which PyTorch's LR schedulers update in place;
- no host syncs inside (``.item()``, printing a tensor, ``GradScaler``): capture raises.
"""
import collections
import warnings

import torch

__all__ = ["inference", "InferenceRunner", "capture_train_step", "TrainStep"]


def _map_tensors(fn, out):
    """``fn`` applied to a Tensor, or to each Tensor of a tuple/list/dict output (one level)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(fn(o) if isinstance(o, torch.Tensor) else o for o in out)
    if isinstance(out, dict):
        return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    raise TypeError(f"vit_fast.graphs: model output must be a Tensor (or a tuple/list/dict of them), "
                    f"got {type(out).__name__}")


class _CapturedGraph:
    """What a capture function returns: something with ``replay()``, and the static output."""

    def __init__(self, graph, output):
        self.graph = graph
        self.output = output

    def replay(self):
        self.graph.replay()


def cuda_capture(body, device, *, warmup=3, warmup_body=None, before_capture=None, pool=None, stream=None):
    """Capture ``body()`` in a CUDA graph on ``device``, PyTorch's documented way.

    ``warmup_body`` (default ``body``) runs ``warmup`` times on ``stream`` (a side stream) first:
    lazy initializations, cuBLAS workspaces, Triton autotuning and compiles happen there, not
    during capture. ``before_capture()`` then runs (the training step sets grads to None), and
    ``body()`` is captured on the same ``stream``, into memory pool ``pool`` when given (graphs
    that share a pool must be captured on the same stream, as torch.cuda.graph's docs note).
    Returns a ``_CapturedGraph`` whose ``output`` is what ``body()`` returned during capture:
    static tensors that each ``replay()`` rewrites in place.
    """
    warmup_body = body if warmup_body is None else warmup_body
    with torch.cuda.device(device):
        stream = torch.cuda.Stream() if stream is None else stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                warmup_body()
        torch.cuda.current_stream().wait_stream(stream)
        if before_capture is not None:
            before_capture()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            output = body()
        return _CapturedGraph(graph, output)


def _first_param(model):
    for p in model.parameters():
        return p
    return None


class InferenceRunner:
    """``model``'s forward, one CUDA graph per (input shape, dtype, device, layout); see `inference`."""

    def __init__(self, model, *, clone=True, max_shapes=8, batch_sizes=None, warmup=3, enabled=True, _capture=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"vit_fast.inference: model must be a torch.nn.Module, got {type(model).__name__}")
        if model.training:
            raise ValueError("vit_fast.inference: the model is in training mode (dropout and drop-path would be "
                             "captured as in training); call model.eval() first")
        if not isinstance(max_shapes, int) or max_shapes < 1:
            raise ValueError(f"vit_fast.inference: max_shapes must be an int >= 1, got {max_shapes!r}")
        if batch_sizes is not None:
            batch_sizes = sorted({int(b) for b in batch_sizes})
            if not batch_sizes or batch_sizes[0] < 1:
                raise ValueError(f"vit_fast.inference: batch_sizes must be positive ints, got {batch_sizes!r}")
            if len(batch_sizes) > max_shapes:
                raise ValueError(f"vit_fast.inference: {len(batch_sizes)} batch_sizes do not fit in "
                                 f"max_shapes={max_shapes} graphs; raise max_shapes")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"vit_fast.inference: warmup must be an int >= 1, got {warmup!r}")
        self.model = model
        self.clone = clone
        self.max_shapes = max_shapes
        self.batch_sizes = batch_sizes
        self.warmup = warmup
        self.enabled = enabled
        self._capture = _capture  # test hook: a capture function used for every device (see cuda_capture)
        self._graphs = collections.OrderedDict()  # key -> (static input, _CapturedGraph), least recent first
        self._pools = {}  # device -> (memory pool, capture stream), shared by every graph on that device
        self._weights_at = None  # the first parameter's data_ptr when the graphs were captured
        self.captures = 0  # how many graphs were captured (a repeated shape does not add one)

    # -- public ---------------------------------------------------------------------------------

    def __call__(self, x):
        self._check(x)
        with torch.inference_mode():
            if not self._use_graphs(x):
                return self.model(x)
            self._check_weights()
            batch = x.shape[0]
            target = self._padded_batch(batch)
            key = self._key(x, target)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture_one(x, target, key)
            else:
                self._graphs.move_to_end(key)
            static_input, captured = entry
            if target == batch:
                static_input.copy_(x)
            else:  # pad: rows past `batch` keep whatever they held (zeros or earlier inputs); images are independent
                static_input[:batch].copy_(x)
            captured.replay()
            out = captured.output
            if target != batch:
                out = _map_tensors(lambda t: t[:batch], out)
            return _map_tensors(torch.clone, out) if self.clone else out

    def prepare(self, example):
        """Capture now, before serving: every size in ``batch_sizes`` (largest first, so the smaller
        graphs reuse the larger one's pool), or ``example``'s shape. ``example``: one input batch."""
        self._check(example)
        if not self._use_graphs(example):
            return self
        with torch.inference_mode():
            self._check_weights()
            for b in sorted(self.batch_sizes or [example.shape[0]], reverse=True):
                key = self._key(example, b)
                if key not in self._graphs:
                    self._capture_one(example, b, key)
        return self

    def reset(self):
        """Drop every captured graph (and its memory); the next calls capture again."""
        self._graphs.clear()
        self._weights_at = None

    @property
    def num_graphs(self):
        return len(self._graphs)

    # -- internals ------------------------------------------------------------------------------

    def _check(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"vit_fast.inference: expected a Tensor of images, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError("vit_fast.inference: expected a batch (a Tensor with a batch dimension), "
                             "got a 0-dim Tensor")
        if self.model.training:
            raise RuntimeError("vit_fast.inference: the model was switched to training mode after wrapping; "
                               "call model.eval() (graphs are captured in eval mode)")
        p = _first_param(self.model)
        if p is not None and p.device != x.device:
            raise ValueError(f"vit_fast.inference: input is on {x.device} but the model's parameters are on "
                             f"{p.device}; move one of them (e.g. images.to('{p.device}'))")

    def _use_graphs(self, x):
        if not self.enabled:
            return False
        if self._capture is not None:
            return True
        return x.device.type == "cuda"

    def _check_weights(self):
        p = _first_param(self.model)
        at = None if p is None else (p.data_ptr(), p.dtype)
        if self._weights_at is not None and at != self._weights_at:
            self._graphs.clear()  # the weights were replaced (model.half(), .to()): recapture
        self._weights_at = at

    def _padded_batch(self, batch):
        if self.batch_sizes:
            for b in self.batch_sizes:
                if b >= batch:
                    return b
        return batch  # no captured size is large enough: a graph of this exact batch

    @staticmethod
    def _key(x, batch):
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return (batch, *x.shape[1:]), x.dtype, x.device, channels_last

    def _capture_one(self, x, batch, key):
        shape, dtype, device, channels_last = key
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        static_input = torch.zeros(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        static_input[: x.shape[0]].copy_(x[:batch])  # warm-up and capture on real data
        while len(self._graphs) >= self.max_shapes:  # LRU: free the least recently used graph first
            self._graphs.popitem(last=False)
        if self._capture is not None:
            captured = self._capture(lambda: self.model(static_input), device, warmup=self.warmup)
        else:
            if device not in self._pools:
                with torch.cuda.device(device):
                    self._pools[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream())
            pool, stream = self._pools[device]
            try:
                captured = cuda_capture(lambda: self.model(static_input), device, warmup=self.warmup,
                                        pool=pool, stream=stream)
            except Exception as err:
                raise RuntimeError(f"vit_fast.inference: capturing the forward for input {tuple(shape)} "
                                   f"{dtype} failed ({type(err).__name__}: {err}); a model with host syncs "
                                   "cannot be captured: use enabled=False to run it eagerly") from err
        _map_tensors(lambda t: t, captured.output)  # checks the output's type
        self._graphs[key] = (static_input, captured)
        self.captures += 1
        return self._graphs[key]


def inference(model, *, clone=True, max_shapes=8, batch_sizes=None, warmup=3, enabled=True):
    """A callable that runs ``model``'s forward with no launch gaps: ``runner(images) -> logits``.

    CUDA inputs: the first call for each (input shape, dtype, device, memory layout) warms the
    model up ``warmup`` times on a side stream and captures its forward in a CUDA graph; later
    calls copy the input into that graph's static input and replay it. All graphs of a runner
    share one memory pool per device (their scratch memory is reused across shapes, which is
    safe because replays never overlap: call one runner from one thread and one stream, not from
    several at once; PyTorch's rule for shared pools). CPU inputs, or
    ``enabled=False``: the model runs eagerly. Always under ``torch.inference_mode()``.

    clone: True (default) returns a fresh tensor each call. False returns the graph's static
        output itself: no copy, but it is overwritten by the runner's next call (of any shape,
        since the graphs share memory); use it before calling again.
    max_shapes: at most this many graphs are kept; the least recently used is freed when a new
        shape arrives, so an unbounded set of batch sizes does not grow memory without bound.
    batch_sizes: e.g. (1, 8, 32, 256): a batch is padded up to the smallest of these that holds
        it, run, and the result sliced back (each image's logits do not depend on the others),
        so serving any batch size costs at most len(batch_sizes) captures. Larger batches than
        the largest get a graph of their own size. ``runner.prepare(example_batch)`` captures
        them all up front.
    warmup: eager iterations before each capture (lazy inits, autotuning, compiles).
    enabled: False runs eagerly everywhere (for A/B checks).

    The model must be in eval mode (``ValueError`` otherwise: a captured training-mode forward
    would bake dropout in); inputs must be Tensors (``TypeError``) on the parameters' device
    (``ValueError``).
    """
    return InferenceRunner(model, clone=clone, max_shapes=max_shapes, batch_sizes=batch_sizes, warmup=warmup,
                           enabled=enabled)


# -- training --------------------------------------------------------------------------------------

# optimizers whose lazily created state is all zeros (a step count of 0, zero moments), so zeroing
# the state the warm-up created gives back a fresh optimizer exactly (SGD: with dampening 0)
_ZERO_STATE_OPTIMIZERS = ("Adam", "AdamW", "SGD", "RAdam", "Adamax")


def check_capturable(optimizer):
    """Raise ``ValueError`` unless every param group of ``optimizer`` was built with ``capturable=True``
    (optimizers without that option, such as SGD, keep no host-side state and pass)."""
    bad = [i for i, g in enumerate(optimizer.param_groups) if "capturable" in g and not g["capturable"]]
    if bad:
        name = type(optimizer).__name__
        raise ValueError(f"vit_fast.capture_train_step: {name} param group(s) {bad} have capturable=False; "
                         f"build it with capturable=True (e.g. torch.optim.{name}(params, lr=..., capturable=True, "
                         "fused=True)) so its step counts stay on the GPU and optimizer.step() can be captured")


def _snapshot(model, optimizer):
    """Copies of the parameters, buffers and optimizer state, to undo the warm-up steps with."""
    tensors = [t for t in (*model.parameters(), *model.buffers())]
    state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return [t.detach().clone() for t in tensors], state


def _restore(model, optimizer, snapshot):
    """Put back what `_snapshot` saw, in place (the captured graph holds these addresses).

    State the warm-up created is reset to a fresh optimizer's: zeros, except NAdam's
    ``mu_product`` (1). For optimizers not known to start from zeros a warning says so.
    """
    saved, state = snapshot
    with torch.no_grad():
        for t, s in zip((*model.parameters(), *model.buffers()), saved):
            t.copy_(s)
        created = False
        for p, s in optimizer.state.items():
            old = state.get(p)
            for k, v in s.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if old is not None and k in old and isinstance(old[k], torch.Tensor):
                    v.copy_(old[k])
                else:
                    created = True
                    v.fill_(1.0 if k == "mu_product" else 0.0)
    name = type(optimizer).__name__
    dampened = name == "SGD" and any(g.get("momentum", 0) and g.get("dampening", 0) for g in optimizer.param_groups)
    if created and (dampened or name not in (*_ZERO_STATE_OPTIMIZERS, "NAdam")):
        warnings.warn(f"vit_fast.capture_train_step: the {name} state created during warm-up was reset to "
                      "zeros, which may differ from its own first-step initialization", stacklevel=3)


class TrainStep:
    """``step(inputs, targets) -> loss``: zero grads, forward, loss, backward, (clip), optimizer.step().

    ``graphed`` says whether it replays a CUDA graph (see `capture_train_step`) or runs eagerly.
    After a call, the parameters are updated, ``p.grad`` holds this step's gradients, and the
    returned loss is a detached 0-dim tensor on the model's device (no host sync: call
    ``.item()`` when you want the number).
    """

    def __init__(self, model, optimizer, loss_fn, sample_inputs, sample_targets, *, amp_dtype=None,
                 max_grad_norm=None, warmup=3, restore=True, enabled=True, _capture=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"vit_fast.capture_train_step: model must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"vit_fast.capture_train_step: optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        for name, t in (("sample_inputs", sample_inputs), ("sample_targets", sample_targets)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"vit_fast.capture_train_step: {name} must be a Tensor, got {type(t).__name__}")
        p = _first_param(model)
        if p is None:
            raise ValueError("vit_fast.capture_train_step: the model has no parameters")
        self.device = p.device
        for name, t in (("sample_inputs", sample_inputs), ("sample_targets", sample_targets)):
            if t.device != self.device:
                raise ValueError(f"vit_fast.capture_train_step: {name} is on {t.device} but the model's "
                                 f"parameters are on {self.device}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"vit_fast.capture_train_step: warmup must be an int >= 1, got {warmup!r}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.amp_dtype, self.max_grad_norm = amp_dtype, max_grad_norm
        self.graphed = bool(enabled) and (_capture is not None or self.device.type == "cuda")
        self._captured = None
        if self.graphed:
            check_capturable(optimizer)
            self._static_inputs = sample_inputs.detach().clone()
            self._static_targets = sample_targets.detach().clone()
            snapshot = _snapshot(model, optimizer) if restore else None

            def body():
                return self._forward_backward_step(self._static_inputs, self._static_targets)

            def warmup_body():
                optimizer.zero_grad(set_to_none=True)
                body()

            def before_capture():  # grads allocated by the captured backward, from the graph's pool
                optimizer.zero_grad(set_to_none=True)

            capture = cuda_capture if _capture is None else _capture
            try:
                with warnings.catch_warnings():  # the warm-up steps run a capturable optimizer uncaptured, on purpose
                    warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                    self._captured = capture(body, self.device, warmup=warmup, warmup_body=warmup_body,
                                             before_capture=before_capture)
            except Exception as err:
                raise RuntimeError(f"vit_fast.capture_train_step: capturing the step failed ({type(err).__name__}: "
                                   f"{err}); a step with host syncs (GradScaler, .item(), data-dependent "
                                   "control flow) cannot be captured: use enabled=False") from err
            if restore:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                _restore(model, optimizer, snapshot)

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        # no autocast weight cache: a cache filled during capture would hold graph-pool tensors
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _forward_backward_step(self, inputs, targets):
        with self._autocast():
            loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss.detach()

    def __call__(self, inputs, targets):
        if not self.graphed:
            self.optimizer.zero_grad(set_to_none=True)
            return self._forward_backward_step(inputs, targets)
        for name, t, static in (("inputs", inputs, self._static_inputs), ("targets", targets, self._static_targets)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"vit_fast train step: {name} must be a Tensor, got {type(t).__name__}")
            if t.shape != static.shape or t.dtype != static.dtype or t.device != static.device:
                raise ValueError(f"vit_fast train step: {name} {tuple(t.shape)} {t.dtype} on {t.device} differ from "
                                 f"the captured {tuple(static.shape)} {static.dtype} on {static.device}; capture "
                                 "another step for this shape (or use enabled=False)")
        self._static_inputs.copy_(inputs)
        self._static_targets.copy_(targets)
        self._captured.replay()
        return self._captured.output.clone()


def capture_train_step(model, optimizer, loss_fn, sample_inputs, sample_targets, *, amp_dtype=None,
                       max_grad_norm=None, warmup=3, restore=True, enabled=True):
    """A training step with no launch gaps: ``step = capture_train_step(...); loss = step(x, y)``.

    Each call: grads set to None, ``loss = loss_fn(model(x), y)`` (under
    ``torch.autocast(dtype=amp_dtype, cache_enabled=False)`` when ``amp_dtype`` is given; autocast
    inside a capture needs its cache off), ``loss.backward()``, ``clip_grad_norm_`` when
    ``max_grad_norm`` is given, ``optimizer.step()``; returns the detached loss.

    Model on CUDA: the whole step is captured once in a CUDA graph, following PyTorch's
    whole-network recipe: ``warmup`` steps on the sample batch on a side stream, grads set to
    None, capture; each call copies ``x`` and ``y`` into the static buffers and replays. Then
    (``restore=True``, the default) the parameters, buffers and optimizer state are put back as
    they were before the warm-up, so the first call is the first update, as in an eager loop.
    ``optimizer`` must be built with ``capturable=True`` (``ValueError`` otherwise); fused AdamW
    with ``capturable=True`` works. Calls must use the sample's shapes and dtypes on the model's
    device (``ValueError`` otherwise). ``GradScaler`` cannot be captured (its step syncs with the
    host): use ``amp_dtype=torch.bfloat16``. Model on CPU, or ``enabled=False``: the same step
    runs eagerly, any shapes.
    """
    return TrainStep(model, optimizer, loss_fn, sample_inputs, sample_targets, amp_dtype=amp_dtype,
                     max_grad_norm=max_grad_norm, warmup=warmup, restore=restore, enabled=enabled)
