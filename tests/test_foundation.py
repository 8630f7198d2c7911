"""The package skeleton: import, dispatch, the reference model's shape and naming, the dependency graph."""
import ast
import importlib
import os
import sys

import pytest
import torch

import vit_fast
from vit_fast import dispatch, reference

# Parameter counts with a 1000-class head, as timm reports them for the same names.
PARAM_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
}


def test_kernels_installed_inside_the_package():
    """The kernels import as vit_fast.kernels from inside the package folder (a checkout reaches them
    through the vit_fast/kernels link, an install through the copied files), never as a top-level
    `kernels` module that would shadow or be shadowed by another project's."""
    for op in ("attention", "layer_norm", "mlp"):
        mod = importlib.import_module(f"vit_fast.kernels.{op}")
        assert os.path.dirname(mod.__file__) == os.path.join(os.path.dirname(vit_fast.__file__), "kernels"), mod.__file__
    assert "kernels" not in sys.modules


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_reference_parameter_counts(name, count):
    with torch.device("meta"):
        model = reference.create_reference(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_reference_state_dict_uses_timm_names():
    with torch.device("meta"):
        keys = list(reference.create_reference("vit_base_patch16_224").state_dict())
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    block0 = [k for k in keys if k.startswith("blocks.0.")]
    assert block0 == [
        f"blocks.0.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    ]
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert len(keys) == 4 + 12 * 12 + 4


def test_reference_forward_matches_hand_written_vit():
    """The reference against the paper's equations written out with plain tensor ops."""
    torch.manual_seed(1)
    model = reference.VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3,
                                        num_classes=5).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd = model.state_dict()
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 64)
    h = patches @ sd["patch_embed.proj.weight"].reshape(24, -1).t() + sd["patch_embed.proj.bias"]
    h = torch.cat([sd["cls_token"].expand(2, -1, -1), h], 1) + sd["pos_embed"]

    def ln(t, pre):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / (var + 1e-6).sqrt() * sd[pre + ".weight"] + sd[pre + ".bias"]

    for i in range(2):
        p = f"blocks.{i}."
        qkv = ln(h, p + "norm1") @ sd[p + "attn.qkv.weight"].t() + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(2, 17, 3, 3, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
        h = h + a.transpose(1, 2).reshape(2, 17, 24) @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        m = ln(h, p + "norm2") @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"]
        m = torch.nn.functional.gelu(m) @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
        h = h + m
    logits = ln(h, "norm")[:, 0] @ sd["head.weight"].t() + sd["head.bias"]
    torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-10)


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_kernels(x) == dispatch.HAS_TRITON
    monkeypatch.setenv(dispatch.FORCE_TORCH_ENV, "1")
    assert not dispatch.use_kernels(x)
    monkeypatch.delenv(dispatch.FORCE_TORCH_ENV)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.use_kernels(x)


def test_interpreter_is_on_for_cpu_runs():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        assert dispatch.use_kernels(torch.zeros(1))


def test_public_api():
    for name in ("attention", "attention_packed", "layer_norm", "add_layer_norm", "linear_gelu", "patch_embed"):
        assert callable(getattr(vit_fast.functional, name))


# --------------------------------------------------------------------------- the dependency graph

PACKAGE = os.path.dirname(os.path.abspath(vit_fast.__file__))
# library modules that still import the oracle, each with where it should go instead: none (the
# patch-embedding op's PyTorch fallback is vit_fast.ops.patch_embed's own; the named configs live in
# vit_fast.configs)
STILL_IMPORT_REFERENCE = set()


def _library_imports():
    """{module: the vit_fast modules it imports, at the top or inside functions}, from the sources."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(root, file)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from vit_fast import model`
        graph[name] = {m for m in found if m in modules and m != "vit_fast" and m != name}
    return graph


def test_the_library_never_imports_the_oracle():
    graph = _library_imports()
    importers = {m for m, deps in graph.items() if "vit_fast.reference" in deps and m != "vit_fast"}
    assert importers <= STILL_IMPORT_REFERENCE, importers - STILL_IMPORT_REFERENCE
    assert not importers and not STILL_IMPORT_REFERENCE, importers  # no library module imports the oracle
    for core in ("vit_fast.model", "vit_fast.checkpoint", "vit_fast.factory", "vit_fast.convert", "vit_fast.pos_embed",
                 "vit_fast.configs", "vit_fast.nn.block", "vit_fast.nn.mlp", "vit_fast.nn.layer_norm",
                 "vit_fast.nn.attention"):
        assert "vit_fast.reference" not in graph[core], core
    assert graph["vit_fast.reference"] == {"vit_fast.configs"}  # the oracle reads the library's configs only
    assert graph["vit_fast.configs"] == set() and graph["vit_fast.pos_embed"] == set()  # leaves


def test_no_import_cycles_among_the_library_modules():
    graph = _library_imports()
    graph.pop("vit_fast")  # the package's __init__ gathers everything; the modules import each other directly
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
    assert "vit_fast.model" not in graph["vit_fast.checkpoint"] and "vit_fast.checkpoint" not in graph["vit_fast.model"]


def test_factories_are_plain_functions_one_per_config():
    from vit_fast import configs, model

    assert reference.CONFIGS is configs.CONFIGS
    assert list(model.MODELS) == list(configs.CONFIGS)
    with open(model.__file__) as f:
        source = f.read()
    for name, factory in model.MODELS.items():
        assert factory.__name__ == name and getattr(vit_fast, name) is factory
        assert f"\ndef {name}(num_classes=1000, **kwargs):\n" in source, name  # greppable, go-to-definition works
    assert "globals()" not in source
    for name in ("create_model", "load_checkpoint", "load_npz", "resample_pos_embed", "convert", "VisionTransformer",
                 "MODELS", *model.MODELS):
        assert name in vit_fast.__all__ and hasattr(vit_fast, name), name
    from vit_fast.checkpoint import resample_pos_embed as from_checkpoint  # the old import keeps working
    assert from_checkpoint is vit_fast.resample_pos_embed is vit_fast.pos_embed.resample_pos_embed
