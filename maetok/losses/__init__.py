"""Training-objective parts of the tokenizer (paper Eq. 6): LPIPS perceptual loss, the hinge GAN loss with
a frozen-backbone discriminator (adaptive weight, LeCAM, DiffAugment) and the VGG16 feature stack."""

from maetok.losses.adversarial import (
    AdversarialLoss,
    DiffAugment,
    LeCAMRegularizer,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularization,
)
from maetok.losses.discriminator import (
    DINOv2Backbone,
    ProjectedDiscriminator,
    VGG16Backbone,
    build_discriminator,
)
from maetok.losses.perceptual import LPIPS, ramp_weight
from maetok.losses.vgg import VGG16Features, load_vgg16_features

__all__ = [
    "AdversarialLoss",
    "DINOv2Backbone",
    "DiffAugment",
    "LPIPS",
    "LeCAMRegularizer",
    "ProjectedDiscriminator",
    "VGG16Backbone",
    "VGG16Features",
    "adaptive_weight",
    "build_discriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "lecam_regularization",
    "load_vgg16_features",
    "ramp_weight",
]
