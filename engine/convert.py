"""Convert a GGUF checkpoint (engine/gguf.py reads it) into a Hugging Face model folder of bf16 weights.

The folder holds a bf16 model.safetensors, config.json, generation_config.json, tokenizer.json and
tokenizer_config.json, so the engine and transformers load it like any checkpoint from the Hub.
"""

import json
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from .errors import InferError
from .gguf import LAYER_TENSORS, read_gguf


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the Hugging Face folder (weights in dtype) for gguf_path into out_dir (created if needed); returns
    out_dir."""
    model = read_gguf(Path(gguf_path))
    out_dir = Path(out_dir)
    tensors = {}
    for t in model.tensors():  # [out, in] or [n]: the numpy order of gguf-py's dequantize is Hugging Face's
        w = gguf.quants.dequantize(t.data.numpy().reshape(-1), gguf.GGMLQuantizationType(t.qtype.code))
        tensors[t.name] = torch.from_numpy(w.reshape(t.shape)).to(dtype)
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{hf}.weight" for i in range(model.config["num_hidden_layers"])
        for kind, hf in LAYER_TENSORS.items() if not kind.endswith("_norm") or model.config["model_type"] == "qwen3"
    ]
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise InferError(f"{Path(gguf_path).name}: {len(missing)} tensors missing, e.g. {missing[0]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    model.tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", model.tokenizer_config)
    write_json(out_dir / "config.json", {**model.config, "torch_dtype": str(dtype).removeprefix("torch.")})
    write_json(out_dir / "generation_config.json",
               {k: v for k, v in model.config.items() if k.endswith("_token_id")})
    return out_dir


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
