"""torch.library registrations, autograd Functions and input checks, one module per op.

The Triton ops (attention.py, layer_norm.py, mlp.py) are built one way, explained here once; each
module's comments point here instead of repeating it. For an op ``<op>`` (layer_norm, linear_act,
mlp, ...):

1. Launch functions, ``_<op>_fwd_launch`` and ``_<op>_bwd_launch``: the plain host code of one
   kernel (or kernels + GEMMs) each. They count the launch (``vit_fast.dispatch.record_launch``),
   allocate the outputs and call the launcher in ``vit_fast.kernels``. Nothing else launches those
   kernels, so compiled and eager calls run the same code and cannot drift apart.
2. Custom ops, ``vit_fast::<op>_fwd`` and ``vit_fast::<op>_bwd`` (``torch.library.custom_op``), whose
   bodies are the launch functions: what a torch.compile graph records (opaque to the compiler)
   and what ``torch.library.opcheck`` tests. Each has a fake impl (``register_fake``: the outputs'
   shapes and dtypes without running, for FakeTensor tracing). No autograd is registered on them:
   the Function below is the op's one autograd formula. A custom op cannot return None, so a
   gradient not asked for comes back from a bwd op as an empty [0] tensor, which the Function
   turns into None. ``custom_op``, not ``triton_op``: triton_op + wrap_triton cannot run under
   Triton's interpreter on fake / functional tensors, so CI (CPU) could not opcheck them.
3. One ``<Op>Function`` (``torch.autograd.Function``) per op. Its forward calls the fwd custom op
   while ``torch.compiler.is_compiling()`` and the fwd launch function otherwise; its backward
   does the same with the bwd pair (``vit_fast.dispatch.op_or_launch``). torch.compile traces the
   Function, so the compiled forward graph holds the fwd op and the backward graph the bwd op. In
   eager mode the launch functions are called directly because the custom-op dispatch around the
   same body (custom_op ``__call__``, the dynamo-disable wrapper, the redispatch) was measured at
   about 60% of the host cost of an eager call, and several rows on a GPU are bound by the launch
   path (``benchmarks/host_overhead.py`` measures it with the launches stubbed). ``forward`` takes
   ctx (no ``setup_context`` staticmethod): with one, ``Function.apply`` runs ``inspect.signature``
   on every call. Outputs that are saved intermediates (statistics, pre-activations) are marked
   non-differentiable, and where one may go unused ``set_materialize_grads(False)`` spares a
   zero-filled gradient for it.
4. The public function (``layer_norm``, ``mlp``, ...) checks its inputs, takes the PyTorch path
   where the kernels do not run (``vit_fast.dispatch.use_kernels``) and otherwise calls
   ``<Op>Function.apply``, compiled or not.

Each of those modules lays this out in sections in the same order, after any helpers of its own:
launches, custom ops, fake impls, autograd Functions, public functions.

patch_embed.py differs in where its ops are defined: ``vit_fast::patch_embed_fwd`` and
``vit_fast::patch_embed_bwd`` are C++ (``csrc/patch_embed.cpp``, TORCH_LIBRARY) with CPU and CUDA
implementations there, so a call goes through the C++ dispatcher alone, with no Python custom-op
wrapper to skip. The module registers their fake impls and autograd from Python
(``register_autograd``, as pytorch/extension-cpp does) and holds the library's own PyTorch pipeline
for when the extension is missing.
"""
