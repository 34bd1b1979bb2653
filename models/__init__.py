"""DTL models. Importing this package registers the ``dtl_*`` entry points in timm's registry."""
from .backbones import backbone_arch, create_backbone, default_rank
from .config import DTLConfig, ModelSettingsError, format_blocks, parse_blocks
from .convert import convert_original_state_dict
from .dtl_vit import DTLEva, DTLVisionTransformer
from .dtl_swin import DTLSwinTransformer, DTLSwinTransformerV2
from .families import (BackboneFamily, default_normalization, family_of_model, family_of_name, get_dtl_model,
                       get_family, list_families, register_family)
from .factory import METHODS, create_dtl_model, create_tuned_model
from .delta import DeltaCheckpoint, build_from_delta, check_delta_folder_supported, read_delta, write_folder, write_pth
from .hub import load_delta, save_delta
from .pretrained import CheckpointError, load_backbone_weights, read_state_dict
from .side_network import CompactSideNetwork, DepthwiseFusion, LowRankTap
from .trainable import (
    apply_trainable_rule,
    count_parameters,
    delta_state_dict,
    is_trainable,
    load_delta_state_dict,
    trainable_report,
)

__all__ = [
    "DTLConfig", "ModelSettingsError", "create_backbone", "default_rank", "parse_blocks", "format_blocks", "convert_original_state_dict", "DTLVisionTransformer", "DTLSwinTransformer",
    "create_dtl_model", "create_tuned_model", "METHODS", "backbone_arch", "CheckpointError", "load_backbone_weights", "read_state_dict",
    "CompactSideNetwork", "DepthwiseFusion", "LowRankTap", "apply_trainable_rule", "count_parameters",
    "delta_state_dict", "is_trainable", "load_delta_state_dict", "trainable_report",
    "save_delta", "load_delta", "DeltaCheckpoint", "read_delta", "write_pth", "write_folder", "build_from_delta",
    "check_delta_folder_supported",
    "DTLEva", "DTLSwinTransformerV2", "BackboneFamily",
    "default_normalization", "family_of_model", "family_of_name", "get_dtl_model", "get_family", "list_families",
    "register_family",
]
