"""Export the bundled model to ONNX: ``python -m app.embedder.export OUT.onnx [--int8]``.

Runs in a child process of the embedder (or once at install time), so that the
serving process never imports torch.  The graph is the whole sentence-transformers
pipeline for all-MiniLM-L6-v2: the BERT encoder, mean pooling over the attention
mask and L2 normalisation; inputs ``input_ids`` and ``attention_mask`` (int64,
batch x tokens), output ``embedding`` (float32, batch x 384).  It reads the local
weights only (never a download) and writes ``OUT`` atomically: a temporary file
in the same directory, renamed when complete.  ``--int8`` then applies ONNX
Runtime's dynamic int8 quantization, per channel, to the weights of the matrix
products (per tensor, the vectors drift much further: cosine min 0.91, not 0.99).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

OPSET = 17


def _module() -> Any:
    import torch
    from transformers import AutoModel

    from app.core.embedding import model_dir

    bert = AutoModel.from_pretrained(str(model_dir()), local_files_only=True).eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEmbedding()


def export(out: Path, *, int8: bool = False) -> None:
    """Write the graph to ``out`` (atomically); ``int8`` quantizes its weights."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.ones((2, 8), dtype=torch.int64)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # a cache other processes read
    try:
        with torch.no_grad():
            torch.onnx.export(
                _module(),
                (sample, sample),
                str(tmp),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                output_names=["embedding"],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "tokens"},
                    "attention_mask": {0: "batch", 1: "tokens"},
                    "embedding": {0: "batch"},
                },
                opset_version=OPSET,
            )
        if int8:
            from onnxruntime.quantization import (  # type: ignore[import-untyped]
                QuantType,
                quantize_dynamic,
            )

            fp32 = tmp.with_suffix(".fp32")
            tmp.replace(fp32)
            try:
                quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            finally:
                fp32.unlink(missing_ok=True)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and argv[1] != "--int8"):
        print("usage: python -m app.embedder.export OUT.onnx [--int8]", file=sys.stderr)
        return 2
    export(Path(argv[0]), int8=len(argv) == 2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
