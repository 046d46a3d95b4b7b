"""Registers timm's EfficientNet / EfficientNet-Lite generators with free width and depth multipliers."""
from timm.models import register_model
from timm.models.efficientnet import _gen_efficientnet, _gen_efficientnet_lite

BACKBONE_NAME = "effsearch_efficientnet"

# The variant names only select timm's pretrained-config entry; weights are never fetched (pretrained=False).
_GENERATORS = {
    "efficientnet": (_gen_efficientnet, "efficientnet_b0"),
    "efficientnet_lite": (_gen_efficientnet_lite, "efficientnet_lite0"),
}


@register_model
def effsearch_efficientnet(pretrained=False, family="efficientnet", width=1.0, depth=1.0, **kwargs):
    """timm's own EfficientNet generators at arbitrary compound-scaling multipliers."""
    if pretrained:
        raise ValueError("effsearch backbones have no pretrained weights; pass a local weights file instead")
    generator, variant = _GENERATORS[family]
    return generator(variant, channel_multiplier=width, depth_multiplier=depth, pretrained=False, **kwargs)
