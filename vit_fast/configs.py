"""The named ViT configurations: name -> VisionTransformer constructor arguments, as timm's factories
of the same names (every other argument at its default: 1000 classes, class token, qkv bias, ...).

A leaf module (no imports): the library's factories (``vit_fast.model``) and the test oracle
(``vit_fast.reference.create_reference``) both read it, so neither imports the other.
"""

CONFIGS = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_tiny_patch16_384": dict(img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_384": dict(img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_384": dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_384": dict(img_size=384, patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_384": dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
}

# The family, from timm 1.0's factories (timm/models/deit.py, vision_transformer.py) and their default
# pretrained configs (img_size from input_size, as timm's fixed_input_size does; pixel statistics for
# uint8 images from mean / std). Every other argument at its default.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_DEIT = dict(patch_size=16, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
_DINOV2 = dict(img_size=518, patch_size=14, init_values=1e-5, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
_REG4 = dict(_DINOV2, reg_tokens=4, no_embed_class=True)
_CLIP = dict(pre_norm=True, norm_eps=1e-5, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
_SIGLIP = dict(class_token=False, global_pool="map")
_SIGLIP_GAP = dict(class_token=False, global_pool="avg", fc_norm=False)
_SO400M = dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)
CONFIGS.update({
    "deit_tiny_distilled_patch16_224": dict(_DEIT, embed_dim=192, depth=12, num_heads=3),
    "deit_small_distilled_patch16_224": dict(_DEIT, embed_dim=384, depth=12, num_heads=6),
    "deit_base_distilled_patch16_224": dict(_DEIT, embed_dim=768, depth=12, num_heads=12),
    "vit_small_patch14_dinov2": dict(_DINOV2, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_dinov2": dict(_DINOV2, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": dict(_DINOV2, embed_dim=1024, depth=24, num_heads=16),
    "vit_small_patch14_reg4_dinov2": dict(_REG4, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_reg4_dinov2": dict(_REG4, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_reg4_dinov2": dict(_REG4, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_clip_224": dict(_CLIP, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_clip_224": dict(_CLIP, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_clip_quickgelu_224": dict(_CLIP, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                                act_layer="quick_gelu"),
    "vit_large_patch14_clip_quickgelu_224": dict(_CLIP, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                                 act_layer="quick_gelu"),
    "vit_base_patch16_siglip_224": dict(_SIGLIP, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_siglip_384": dict(_SIGLIP, img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_so400m_patch14_siglip_384": dict(_SIGLIP, **_SO400M, img_size=384),
    "vit_base_patch16_siglip_gap_224": dict(_SIGLIP_GAP, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_siglip_gap_384": dict(_SIGLIP_GAP, img_size=384, patch_size=16, embed_dim=768, depth=12,
                                            num_heads=12),
    "vit_so400m_patch14_siglip_gap_384": dict(_SIGLIP_GAP, **_SO400M, img_size=384),
})

# names whose model class is not VisionTransformer: "distilled" = VisionTransformerDistilled (timm's deit.py);
# the oracle (vit_fast.reference.create_reference) picks its class from this, the library's factories name theirs
MODEL_CLASSES = {name: "distilled" for name in CONFIGS if "_distilled_" in name}

# EVA-02 (timm/models/eva.py: the eva02_*_patch14_224 factories; timm's Eva class, its own file there and
# here: vit_fast.eva). Eva's defaults: global_pool 'avg' (so fc_norm, no final norm), qkv_bias with
# q_bias / v_bias (no k bias), init_values None, rope 'cat' (in_pixels False, temperature 1e4, grid offset
# 0, 'ij'). mlp_ratio 4 * 2 / 3: int(dim * ratio) hidden units per SwiGLU half. tiny / small: packed fc1
# (timm's GluMlp, SiLU, gate first) and fused qkv; base / large: scale_mlp (SwiGLU fc1_g / fc1_x with a
# LayerNorm before fc2) and separate q_proj / k_proj / v_proj. Pixel statistics: OpenAI CLIP's (_cfg).
_EVA02 = dict(img_size=224, patch_size=14, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True,
              ref_feat_shape=(16, 16), pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
EVA_CONFIGS = {
    "eva02_tiny_patch14_224": dict(_EVA02, embed_dim=192, depth=12, num_heads=3),
    "eva02_small_patch14_224": dict(_EVA02, embed_dim=384, depth=12, num_heads=6),
    "eva02_base_patch14_224": dict(_EVA02, embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True),
    "eva02_large_patch14_224": dict(_EVA02, embed_dim=1024, depth=24, num_heads=16, qkv_fused=False,
                                    scale_mlp=True),
}
