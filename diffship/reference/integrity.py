"""What a diffusers folder must be before it is exported: the classes its family expects, and weight files
that fit those modules exactly.

Loading alone does not prove it: transformers and diffusers initialise missing weights randomly and report
it only in a log line, and a ``model_index.json`` may name another architecture than the family's. An
export made from such a source would be wrong with exit code 0, so both are refused here, naming the
first keys, before anything is exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffship.errors import SourceError
from diffship.reference.weights import ignored_key, stored_tensors, weight_files

_SHOWN = 3


def check_classes(folder: Path, index: dict[str, Any], family: Any) -> None:
    """Refuse a folder whose ``model_index.json`` names another class for a module than its family's
    (a ``text_encoder`` of another architecture), or library components the family does not take.

    Raises:
        SourceError: naming the module, the class found and the class expected.
    """
    for name, (library, class_name) in family.modules.items():
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:  # absent (the SDXL refiner's text encoder)
            continue
        if list(entry) != [library, class_name]:
            raise SourceError(f"{folder}: {name} is {'.'.join(map(str, entry))} in model_index.json, but a "
                              f"{family.name} pipeline's {name} is a {library}.{class_name}; diffship exports only "
                              f"the architectures it knows")
    for name, entry in index.items():
        if name in family.library and isinstance(entry, list) and entry[0] is not None:
            try:
                family.component_class(name, entry)
            except SourceError as exc:
                raise SourceError(f"{folder}: {exc}") from None


def check_weights(folder: Path, pipe: Any, family: Any) -> None:
    """Refuse a folder whose weight files do not fit the loaded modules: keys the module has and the files
    lack (they would be initialised randomly), keys the files have and the module does not take, and
    tensors of another shape. Only safetensors files are read (their headers: no weights are loaded).

    Raises:
        SourceError: naming the module and its first missing, unexpected or mis-shaped keys.
    """
    for name in family.modules:
        module = getattr(pipe, name, None)
        if module is None or not weight_files(folder / name):
            continue
        stored = {k: t.shape for k, t in stored_tensors(folder / name, module).items()}
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        missing = [k for k in expected if k not in stored and not ignored_key(module, k, "missing")]
        unexpected = [k for k in stored if k not in expected and not ignored_key(module, k, "unexpected")]
        shaped = [f"{k} {stored[k]} (the model has {expected[k]})" for k in expected
                  if k in stored and stored[k] != expected[k]]
        problems = [f"{what}: {', '.join(keys[:_SHOWN])}" + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped))
                    if keys]
        if problems:
            raise SourceError(f"{folder / name}: the weights do not fit its {type(module).__name__} ({'; '.join(problems)}); "
                              f"a missing weight would be exported randomly initialised: re-save the pipeline")

