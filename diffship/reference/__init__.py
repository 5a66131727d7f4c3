"""The eager side: loading diffusers pipelines, the built-in presets, and the component specs.

Modules by job: :mod:`~.loader` (folders, single files, presets), :mod:`~.presets` (built offline),
:mod:`~.shapes` (request shapes), :mod:`~.specs` (:class:`ComponentSpec`), :mod:`~.wrappers` (the exported
graphs), :mod:`~.calls` (diffusers call -> spec inputs), :mod:`~.families` (pipeline families and their
specs), :mod:`~.pipelines` (building pipelines, schedulers, configs), :mod:`~.recording` (eager inputs),
:mod:`~.attention` (split-einsum attention).
"""

from diffship.reference.families import FAMILIES, Family, family_of, supported_classes
from diffship.reference.loader import PRESETS, SourceInfo, load, load_with_info
from diffship.reference.pipelines import specs_for_pipeline
from diffship.reference.presets import RECIPES, build_preset, build_tiny, preset_path, tiny_path
from diffship.reference.shapes import ShapeProfile, ShapeRange
from diffship.reference.specs import ComponentSpec, TensorSpec

__all__ = [
    "FAMILIES", "PRESETS", "RECIPES", "ComponentSpec", "Family", "ShapeProfile", "ShapeRange", "SourceInfo",
    "TensorSpec", "build_preset", "build_tiny", "family_of", "load", "load_with_info", "preset_path",
    "specs_for_pipeline", "supported_classes", "tiny_path",
]
