"""CLIP's BPE vocabulary as ``vocab.json`` + ``merges.txt``, the files slow tokenizers read.

transformers 5 saves a tokenizer as ``tokenizer.json`` only; transformers 4's ``CLIPTokenizer`` (which
optimum-onnx and optimum-intel load, pinned below transformers 4.58) and the BPE tokenizer of Apple's
Swift pipeline read ``vocab.json`` and ``merges.txt``. Both are rebuilt from ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffship.errors import SourceError

FILES = ("vocab.json", "merges.txt")


def bpe_files(tokenizer: Path) -> dict[str, str]:
    """The text of ``vocab.json`` and ``merges.txt`` for the tokenizer saved in folder ``tokenizer``:
    the files themselves where they are there, else rebuilt from its ``tokenizer.json``.

    Raises:
        SourceError: the folder has neither, or its ``tokenizer.json`` is not a BPE model.
    """
    tokenizer = Path(tokenizer)
    if all((tokenizer / name).is_file() for name in FILES):
        return {name: (tokenizer / name).read_text(encoding="utf-8") for name in FILES}
    try:
        model = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        vocab, merges = model["vocab"], model["merges"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{tokenizer} has neither vocab.json + merges.txt nor a BPE tokenizer.json "
                          f"({type(exc).__name__}: {exc}); save the tokenizer with transformers again") from None
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(lines) + "\n"}
