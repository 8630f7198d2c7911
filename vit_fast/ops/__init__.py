"""torch.library registrations, autograd Functions and input checks, one module per op.

The Triton ops (attention.py, layernorm.py, mlp.py) are built one way, explained here once; each
module's comments point here instead of repeating it. For an op ``<op>`` (layer_norm, linear_act,
mlp, ...):

1. Launch functions, ``_<op>_fwd_launch`` and ``_<op>_bwd_launch``: the plain host code of one
   kernel (or kernels + GEMMs) each. They count the launch (``vit_fast.dispatch.record_launch``),
   allocate the outputs and call the launcher in ``vit_fast.kernels``. Nothing else launches those
   kernels, so the two paths below run the same code and cannot drift apart.
2. Custom ops, ``vit_fast::<op>_fwd`` and ``vit_fast::<op>_bwd`` (``torch.library.custom_op``), whose
   bodies are the launch functions; what torch.compile traces and ``torch.library.opcheck`` tests.
   Each has a fake impl (``register_fake``: the outputs' shapes and dtypes without running, for
   FakeTensor tracing), and the fwd op has ``register_autograd(_<op>_backward,
   setup_context=_<op>_setup_context)``, whose backward calls the bwd custom op, so a compiled
   graph holds both ops. A custom op cannot return None: a gradient not asked for comes back as an
   empty [0] tensor, and the autograd code turns it into None. ``custom_op``, not ``triton_op``:
   triton_op + wrap_triton cannot run under Triton's interpreter on fake / functional tensors, so
   CI (CPU) could not opcheck them.
3. The eager twin, ``<Op>Function`` (a ``torch.autograd.Function``): the same launch functions and
   the same context and gradient code (``_<op>_setup_context``, and ``_<op>_grads(ctx, ..., backward)``
   called with the bwd launch function where the registered backward passes the bwd custom op),
   without the custom-op plumbing (custom_op ``__call__``, its autograd wrapper, the dynamo-disable
   wrapper, the redispatch). Why: that plumbing measured ~60% of the host cost of an eager call
   (layer_norm fwd + bwd at 6-10x F.layer_norm's host time; ~290 us of host time per linear_gelu
   fwd + bwd; ``benchmarks/host_overhead.py``, launches stubbed), and several H100 rows are bound by
   the launch path. ``forward`` takes ctx (no ``setup_context`` staticmethod): with one,
   ``Function.apply`` runs ``inspect.signature`` on every call.
4. The public function (``layer_norm``, ``mlp``, ...) checks its inputs, takes the PyTorch path
   where the kernels do not run (``vit_fast.dispatch.use_kernels``), and on the kernel path calls the
   custom op when ``torch.compiler.is_compiling()`` and ``<Op>Function.apply`` otherwise. Both give
   bit-identical outputs and gradients (the op tests compare them).

Each of those modules lays this out in sections in the same order: launches, custom ops, fake
impls, autograd (setup_context, grads, register_autograd), eager Functions, public functions.

patch_embed.py differs: its op is defined in C++ (``csrc/patch_embed.cpp``, TORCH_LIBRARY), with
CPU and CUDA implementations there; the module registers its fake impls and autograd from Python
and holds the library's own PyTorch pipeline for when the extension is missing.
"""
