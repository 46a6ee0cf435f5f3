"""GGUF files run natively: our reader against gguf-py's, the demo GGUFs against their float32 folders token for
token, the packed weights (as CUDA keeps them) against the same weights dequantized, and damaged files."""

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from infer.engine.convert import convert_gguf
from infer.engine.gguf import GGUFFile, read_gguf
from infer.engine.generate import Engine
from infer.engine.sampling import SamplingParams
from infer.engine.weights import Checkpoint, load_model
from infer.kernels import quant
from infer.weights.catalogue import CATALOGUE, fetch_gguf

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]


@pytest.fixture(scope="module", params=list(CATALOGUE))
def demo(request, smollm2, qwen, tmp_path_factory):
    """(the demo's GGUF file, the same model dequantized into a float32 folder)."""
    path = fetch_gguf(CATALOGUE[request.param])
    return path, convert_gguf(path, tmp_path_factory.mktemp(request.param), torch.float32)


def test_our_reader_reads_what_gguf_py_reads(demo):
    path, _ = demo
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, f in theirs.fields.items():
        if not key.startswith("GGUF."):  # gguf-py's own header pseudo-fields
            assert ours.fields[key] == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.type_code, a.shape, a.n_bytes) == (int(b.tensor_type), tuple(reversed(b.shape.tolist())), b.n_bytes)
        assert np.array_equal(ours.data(a), np.asarray(b.data).reshape(-1).view(np.uint8)), a.name


def test_the_gguf_generates_what_its_float32_folder_generates(demo):
    path, folder = demo
    native, reference = (Engine(p, device="cpu", progress=False, lookup=False) for p in (path, folder))
    assert native.model_context == reference.model_context and native.eos_ids == reference.eos_ids
    for prompt in PROMPTS:
        tokens = native.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        assert tokens == reference.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=32)
        assert "".join(native.generate(tokens, params)) == "".join(reference.generate(tokens, params)), prompt
        assert native.stats.generated_tokens >= 8


def test_the_cpu_keeps_an_untied_embedding_in_its_blocks(demo):
    """On the CPU a GGUF's matrices are dequantized as they load, except an embedding table that is not also the
    LM head (the Qwen demo's); the size the memory check plans with is what the loaded weights take."""
    path, _ = demo
    checkpoint = Checkpoint(path)
    cfg = checkpoint.config()
    model = load_model(checkpoint, cfg, torch.device("cpu"), torch.float32, progress=False)
    assert (model.embed_tokens.qtype is None) == cfg.tie_word_embeddings and model.lm_head.qtype is None
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied LM head's weight counted once
    assert checkpoint.weight_bytes(cfg, torch.float32, packed=False) == held


# A tiny llama with every projection in another type: q Q4_K, k Q6_K, v Q8_0 (q/k/v then run one after the other),
# gate/up Q5_0 (fused), down Q5_K, o Q4_1, the tied embedding Q4_0.
TYPES = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q5_0",
         "ffn_up": "Q5_0", "ffn_down": "Q5_K"}
HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2


def small_blocks(name: str, rows: int, cols: int, gen: torch.Generator) -> np.ndarray:
    """Valid blocks of a type for a [rows, cols] weight with values of about 0.05: gguf-py's quantizer where it has
    one, else random quants under small scales."""
    if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        values = (torch.randn(rows, cols, generator=gen) * 0.05).numpy()
        return gguf.quants.quantize(values, gguf.GGMLQuantizationType[name])
    qt = quant.quant_type(name)
    blocks = torch.randint(0, 256, (rows, cols // qt.block_elems, qt.block_bytes), dtype=torch.uint8, generator=gen)
    scales = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[name]
    for at in scales:  # d (and dmin): small positive fp16
        blocks[..., at:at + 2] = (torch.rand(rows, cols // qt.block_elems, 1, generator=gen) * 0.004 + 0.001
                                  ).half().view(torch.uint8)
    return blocks.reshape(rows, -1).numpy()


def byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 characters its BPE vocabularies spell bytes with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random two-layer llama GGUF with a byte-level vocabulary of 257 tokens (the bytes, then an end of text)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (("llama.embedding_length", HIDDEN), ("llama.feed_forward_length", FFN),
                       ("llama.block_count", LAYERS), ("llama.attention.head_count", HEADS),
                       ("llama.attention.head_count_kv", KV_HEADS), ("llama.context_length", 256)):
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(byte_tokens() + ["<|endoftext|>"])
    writer.add_token_types([1] * 256 + [3])
    writer.add_token_merges([])
    writer.add_eos_token_id(256)
    gen = torch.Generator().manual_seed(0)
    tensors = {"token_embd.weight": ("Q4_0", 257, HIDDEN), "output_norm.weight": ("F32", HIDDEN)}
    for i in range(LAYERS):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * 64, HIDDEN), "attn_v": (KV_HEADS * 64, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
                  "ffn_down": (HIDDEN, FFN)}
        tensors.update({f"blk.{i}.{kind}.weight": (TYPES[kind], *shape) for kind, shape in shapes.items()})
        tensors.update({f"blk.{i}.{norm}.weight": ("F32", HIDDEN) for norm in ("attn_norm", "ffn_norm")})
    for name, (kind, *shape) in tensors.items():
        if kind == "F32":
            writer.add_tensor(name, (1 + 0.1 * torch.randn(*shape, generator=gen)).numpy())
        else:
            blocks = small_blocks(kind, *shape, gen)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("chunks", [[20, 1, 5], [3, 16]])  # dequantized for cuBLAS, one row, a few rows
def test_packed_weights_equal_the_same_weights_dequantized(tiny_gguf, chunks):
    """As CUDA runs a GGUF: its quantized weights kept in their blocks (the kernels under the interpreter here),
    the mixed-type q/k/v, the packed tied embedding and LM head; against the same model dequantized at load."""
    checkpoint = Checkpoint(tiny_gguf)
    cfg = checkpoint.config()
    packed, dense = (load_model(checkpoint, cfg, torch.device("cpu"), torch.float32, progress=False, packed=p)
                     for p in (True, False))
    assert packed.layers[0].self_attn.qkv_proj.__class__.__name__ == "Concat"  # q, k, v in three types
    assert packed.layers[0].mlp.gate_up_proj.qtype.name == "Q5_0" and packed.lm_head.qtype.name == "Q4_0"
    assert dense.lm_head.qtype is None
    tokens = torch.randint(0, cfg.vocab_size, (sum(chunks),), generator=torch.Generator().manual_seed(1))
    caches = packed.new_cache(64), dense.new_cache(64)
    begin = 0
    for n in chunks:
        got, want = (m(tokens[begin:begin + n], c, num_logits=n) for m, c in zip((packed, dense), caches))
        # fp32 both ways; the kernels sum in another order (measured: up to 3e-4 on logits of about 1)
        assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (n, (got - want).abs().max())
        begin += n


def infer(*args):
    return subprocess.run([sys.executable, "-m", "infer.cli.main", *args], capture_output=True, text=True, timeout=300)


def damaged(tmp_path: Path, source: Path, edit) -> Path:
    path = tmp_path / "damaged.gguf"
    shutil.copy(source, path)
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))
    return path


def tensor_info_offset(data: bytearray, name: str) -> int:
    """Where a tensor's info (after its name) starts in the file."""
    return data.index(name.encode()) + len(name)


@pytest.mark.parametrize("damage, words", [
    (lambda d: d.__delitem__(slice(len(d) // 2, None)), ["truncated"]),
    (lambda d: d.__setitem__(slice(0, 4), b"GGUX"), ["magic"]),
    (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 7)), ["version 7"]),
    # output_norm.weight: n_dims (1), its one dim, then its type: an unknown GGML type code
    (lambda d: d.__setitem__(slice(tensor_info_offset(d, "output_norm.weight") + 12,
                                   tensor_info_offset(d, "output_norm.weight") + 16), struct.pack("<I", 99)),
     ["output_norm.weight", "99"]),
    # ... and its offset far past the end of the file
    (lambda d: d.__setitem__(slice(tensor_info_offset(d, "output_norm.weight") + 16,
                                   tensor_info_offset(d, "output_norm.weight") + 24), struct.pack("<Q", 1 << 40)),
     ["output_norm.weight", "past the end"]),
    (lambda d: d.__setitem__(slice(d.index(b"llama"), d.index(b"llama") + 5), b"bloom"), ["architecture 'bloom'"]),
])
def test_a_damaged_gguf_is_a_one_line_error(tiny_gguf, tmp_path, damage, words):
    path = damaged(tmp_path, tiny_gguf, damage)
    r = infer("generate", str(path), "-p", "hi", "--max-tokens", "2")
    errors = [line for line in r.stderr.splitlines() if line.startswith("infer: error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in errors[0] for w in words), errors


def test_the_tiny_gguf_runs_from_the_command_line(tiny_gguf):
    r = infer("generate", str(tiny_gguf), "--raw", "-p", "Once upon a time", "--max-tokens", "4")
    assert r.returncode == 0 and "stopped:" in r.stderr, r.stderr
    assert read_gguf(tiny_gguf).config["num_hidden_layers"] == LAYERS


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_rounds_a_float_model_as_it_loads(tmp_path, smollm2, quantize):
    """--quantize: every matrix of a float folder holds quant.quantize's blocks of its weights (packed, as CUDA keeps
    them; dequantized on the CPU), the norms stay as they were; a GGUF refuses it."""
    from conftest import random_model_folder

    from infer.engine.errors import ParameterError
    from infer.engine.weights import QUANTIZE

    folder = random_model_folder(tmp_path / "m", smollm2, model_type="llama", vocab_size=49152, hidden_size=64,
                                 intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    checkpoint = Checkpoint(folder)
    cfg = checkpoint.config()
    plain = load_model(checkpoint, cfg, torch.device("cpu"), torch.float32, progress=False)
    qt = QUANTIZE[quantize]
    for packed in (True, False):
        model = load_model(checkpoint, cfg, torch.device("cpu"), torch.float32, progress=False, packed=packed,
                           quantize=quantize)
        down = model.layers[0].mlp.down_proj
        blocks = quant.quantize(plain.layers[0].mlp.down_proj.weight, qt)
        if packed:
            assert down.qtype == qt and torch.equal(down.weight, quant.to_kernel_layout(blocks, qt))
        else:
            assert down.qtype is None and torch.equal(down.weight, quant.reference(blocks, qt))
        assert not torch.equal(down.weight, plain.layers[0].mlp.down_proj.weight)
        assert torch.equal(model.norm.weight, plain.norm.weight)
    with pytest.raises(ParameterError, match="quantized already"):
        load_model(Checkpoint(fetch_gguf(CATALOGUE["smollm2-135m-instruct"])), cfg, torch.device("cpu"),
                   torch.float32, progress=False, quantize=quantize)
