"""The eager side: loading diffusers pipelines, the built-in tiny pipeline and the component specs."""

from diffship.reference.families import FAMILIES, Family, family_of, specs_for_pipeline, supported_classes
from diffship.reference.loader import PRESETS, SourceInfo, load, load_with_info
from diffship.reference.specs import ComponentSpec, ShapeProfile, TensorSpec
from diffship.reference.presets import RECIPES, build_preset, build_tiny, preset_path, tiny_path

__all__ = [
    "FAMILIES", "PRESETS", "RECIPES", "ComponentSpec", "Family", "ShapeProfile", "SourceInfo", "TensorSpec", "build_preset", "build_tiny", "preset_path",
    "family_of", "load", "load_with_info", "specs_for_pipeline", "supported_classes", "tiny_path",
]
