"""The lazy safetensors reader: exact round trips, sub-matrix reads, laziness, and one clear error per failure."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import QWEN3_CONFIG, qwen3_state_dict, random_state_dict, write_raw_checkpoint, write_trainer_state
from safetensors.torch import save_file

from opd_lens.checkpoints import MatrixRef, matched_matrices, open_checkpoint, save_checkpoint
from opd_lens.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    OpdLensError,
    ShapeMismatchError,
    UnsupportedTensorError,
)

Q, KV, H = 16, 8, 16
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    """A safetensors-like file from a header (dict or raw bytes), its 8-byte length (default: true) and data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return path


# --- exact round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_single_and_sharded_read_back_exactly(tmp_path, dtype):
    sd = qwen3_state_dict(n_layers=2, dtype=dtype)
    names = list(sd)
    dirs = {
        "single": save_checkpoint(tmp_path / "single", sd),
        "sharded": save_checkpoint(tmp_path / "sharded", sd, max_shard_bytes=1500),
        "raw-single": write_raw_checkpoint(tmp_path / "raw-single", sd),
        "raw-sharded": write_raw_checkpoint(
            tmp_path / "raw-sharded", sd, shards=[names[::3], names[1::3], names[2::3]]
        ),
    }
    assert len(list(dirs["sharded"].glob("model-*.safetensors"))) >= 3
    for kind, d in dirs.items():
        ckpt = open_checkpoint(d)
        assert set(ckpt.tensors) == set(sd), kind
        for name, t in sd.items():
            got = ckpt.read(name)
            assert got.dtype == dtype, (kind, name)
            assert torch.equal(got, t), (kind, name)
    # the sharded checkpoints really spread tensors over several files
    for kind in ("sharded", "raw-sharded"):
        files = {info.file for info in open_checkpoint(dirs[kind]).tensors.values()}
        assert len(files) >= 3, kind


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_tensor_infos_come_from_the_header(tmp_path, dtype):
    sd = qwen3_state_dict(n_layers=1, dtype=dtype)
    names = list(sd)
    d = write_raw_checkpoint(tmp_path / "c", sd, shards=[names[:4], names[4:]])
    ckpt = open_checkpoint(d)
    for name, t in sd.items():
        info = ckpt.tensors[name]
        assert info.dtype == DTYPES[dtype]
        assert info.shape == tuple(t.shape)
        expected_file = "model-00001-of-00002.safetensors" if name in names[:4] else "model-00002-of-00002.safetensors"
        assert info.file == d / expected_file
    assert ckpt.tensors["model.layers.0.input_layernorm.weight"].shape == (16,)


def test_mixed_dtypes_and_f64(tmp_path):
    sd = {
        "model.layers.0.a.weight": torch.randn(3, 2, dtype=torch.float64),
        "model.layers.0.b.weight": torch.randn(3, 2).half(),
        "empty": torch.zeros(0, 4),
    }
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "c", sd))
    assert {k: v.dtype for k, v in ckpt.tensors.items()} == {
        "model.layers.0.a.weight": "F64",
        "model.layers.0.b.weight": "F16",
        "empty": "F32",
    }
    assert ckpt.tensors["empty"].shape == (0, 4)
    for name, t in sd.items():
        assert torch.equal(ckpt.read(name), t)


def test_read_a_0d_tensor(tmp_path):
    # some checkpoints store scalars (e.g. a logit scale); read() promises "the whole stored tensor"
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "c", {"logit_scale": torch.tensor(1.5), "w": torch.ones(2, 2)}))
    assert ckpt.tensors["logit_scale"].shape == ()
    got = ckpt.read("logit_scale")
    assert got.shape == () and got.item() == 1.5


def test_step_from_trainer_state_or_argument(tmp_path):
    d = save_checkpoint(tmp_path / "c", {"w": torch.zeros(2, 2)}, step=40)
    assert open_checkpoint(d).step == 40
    assert open_checkpoint(d, step=7).step == 7
    write_trainer_state(d, 41)
    assert open_checkpoint(d).step == 41
    (d / "trainer_state.json").write_text('{"global_step": true}')
    assert open_checkpoint(d).step is None
    (d / "trainer_state.json").write_text("{not json")
    assert open_checkpoint(d).step is None
    (d / "trainer_state.json").unlink()
    assert open_checkpoint(d).step is None


def test_config_is_read_beside_the_weights(tmp_path):
    d = save_checkpoint(tmp_path / "c", {"w": torch.zeros(2, 2)}, config=QWEN3_CONFIG)
    assert open_checkpoint(d).config == QWEN3_CONFIG
    (d / "config.json").write_text("{broken")
    assert open_checkpoint(d).config == {}
    (d / "config.json").unlink()
    assert open_checkpoint(d).config == {}


# --- read_matrix: every kind of MatrixRef --------------------------------------------------------------------------


@pytest.fixture
def matrix_ckpt(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {
        "plain": torch.randn(6, 5, generator=g).bfloat16(),
        "conv1d": torch.randn(5, 9, generator=g).bfloat16(),  # stored (in, out)
        "experts": torch.randn(3, 6, 5, generator=g).bfloat16(),  # [E, out, in]
        "experts_t": torch.randn(3, 5, 6, generator=g).bfloat16(),  # [E, in, out]
    }
    return sd, open_checkpoint(save_checkpoint(tmp_path / "m", sd, max_shard_bytes=200))


def _expected_cases(sd):
    # (ref, expected tensor) pairs, each expected slice computed from the full saved tensor
    return [
        (MatrixRef(0, "plain", "plain", (6, 5)), sd["plain"]),
        (MatrixRef(0, "rows", "plain", (2, 5), rows=(1, 3)), sd["plain"][1:3]),
        (MatrixRef(0, "t", "conv1d", (9, 5), transpose=True), sd["conv1d"].T),
        (MatrixRef(0, "t_rows", "conv1d", (3, 5), transpose=True, rows=(6, 9)), sd["conv1d"][:, 6:9].T),
        (MatrixRef(0, "e", "experts", (6, 5), expert=2), sd["experts"][2]),
        (MatrixRef(0, "e_rows", "experts", (3, 5), expert=1, rows=(3, 6)), sd["experts"][1, 3:6]),
        (MatrixRef(0, "e_t", "experts_t", (6, 5), expert=0, transpose=True), sd["experts_t"][0].T),
        (
            MatrixRef(0, "e_t_rows", "experts_t", (3, 5), expert=2, transpose=True, rows=(0, 3)),
            sd["experts_t"][2].T[0:3],
        ),
    ]


def test_read_matrix_every_ref_kind(matrix_ckpt):
    sd, ckpt = matrix_ckpt
    for ref, expected in _expected_cases(sd):
        got = ckpt.read_matrix(ref)
        assert got.dtype == torch.bfloat16, ref
        assert tuple(got.shape) == ref.shape, ref
        assert got.is_contiguous(), ref
        assert torch.equal(got, expected), ref


def test_read_matrix_shape_disagreeing_with_ref(matrix_ckpt):
    _, ckpt = matrix_ckpt
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.read_matrix(MatrixRef(0, "plain", "plain", (5, 6)))
    assert str(ckpt.tensors["plain"].file) in str(ei.value) and "'plain'" in str(ei.value)


def test_read_unknown_tensor(matrix_ckpt):
    _, ckpt = matrix_ckpt
    for call in (lambda: ckpt.read("nope.weight"), lambda: ckpt.read_matrix(MatrixRef(0, "x", "nope.weight", (1, 1)))):
        with pytest.raises(CheckpointError) as ei:
            call()
        assert "nope.weight" in str(ei.value) and str(ckpt.path) in str(ei.value)


# --- laziness --------------------------------------------------------------------------------------------------


def _two_shards(tmp_path):
    sd = qwen3_state_dict(n_layers=2)
    first = [n for n in sd if ".layers.0." in n]
    rest = [n for n in sd if n not in first]
    d = write_raw_checkpoint(tmp_path / "lazy", sd, shards=[first, rest])
    return sd, d, d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"


def test_open_reads_headers_only(tmp_path):
    # the data region of shard 2 is garbage before opening: open and reads from shard 1 still work
    sd, d, _, shard2 = _two_shards(tmp_path)
    data = bytearray(shard2.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n :] = os.urandom(len(data) - 8 - n)
    shard2.write_bytes(bytes(data))
    ckpt = open_checkpoint(d)
    name = "model.layers.0.self_attn.q_proj.weight"
    ref = ckpt.plan().by_key()[0, "self_attn.q_proj"]
    assert torch.equal(ckpt.read_matrix(ref), sd[name])


def test_reading_one_matrix_does_not_touch_other_shards(tmp_path):
    sd, d, shard1, shard2 = _two_shards(tmp_path)
    ckpt = open_checkpoint(d)
    size = shard2.stat().st_size
    shard2.write_bytes(os.urandom(size))  # replaced by garbage AFTER opening
    plan = ckpt.plan().by_key()
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        ref = plan[0, module]
        assert ckpt.tensors[ref.tensor].file == shard1
        assert torch.equal(ckpt.read_matrix(ref), sd[ref.tensor])


def test_reading_from_a_shard_replaced_by_garbage(tmp_path):
    _, d, _, shard2 = _two_shards(tmp_path)
    ckpt = open_checkpoint(d)
    shard2.write_bytes(os.urandom(shard2.stat().st_size))
    ref = ckpt.plan().by_key()[1, "self_attn.k_proj"]
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.read_matrix(ref)
    assert str(shard2) in str(ei.value) and ref.tensor in str(ei.value)


def test_reading_from_a_shard_deleted_after_opening(tmp_path):
    _, d, _, shard2 = _two_shards(tmp_path)
    ckpt = open_checkpoint(d)
    shard2.unlink()
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.read("model.layers.1.mlp.up_proj.weight")
    assert str(shard2) in str(ei.value) and "model.layers.1.mlp.up_proj.weight" in str(ei.value)


@pytest.mark.parametrize(
    "header, nbytes",
    [
        # two tensors claiming the same bytes: sizes add up, safetensors rejects the offsets on read
        (
            {
                "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            },
            16,
        ),
        # a hole before the only tensor
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}, 32),
    ],
    ids=["overlapping", "hole"],
)
def test_inconsistent_offsets_give_corrupt_checkpoint_error(tmp_path, header, nbytes):
    f = _raw_file(tmp_path / "c" / "model.safetensors", header, b"\0" * nbytes)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c").read("a")
    assert str(f) in str(ei.value)


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(tmp_path / "gone")
    assert str(tmp_path / "gone") in str(ei.value) and "does not exist" in str(ei.value)


def test_path_is_a_file(tmp_path):
    f = save_checkpoint(tmp_path / "c", {"w": torch.zeros(1, 1)}) / "model.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        open_checkpoint(f)


def test_directory_without_weights(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="empty directory") as ei:
        open_checkpoint(d)
    assert str(d) in str(ei.value)
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(d)
    assert str(d) in str(ei.value) and "config.json" in str(ei.value)


def test_directory_with_only_pytorch_model_bin(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    torch.save({"w": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(d)
    msg = str(ei.value)
    assert str(d) in msg and "pytorch_model.bin" in msg
    assert "pickle" in msg and "safetensors only" in msg


def test_hub_snapshot_with_only_pytorch_model_bin_says_pickle(tmp_path):
    # a typical older Hub snapshot: the .bin sorts after eight other files
    d = tmp_path / "snapshot"
    d.mkdir()
    for name in (
        ".gitattributes",
        "LICENSE",
        "NOTICE",
        "README.md",
        "added_tokens.json",
        "config.json",
        "generation_config.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer.json",
        "vocab.json",
    ):
        (d / name).write_text("{}")
    torch.save({"w": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointNotFoundError) as ei:
        open_checkpoint(d)
    assert "pickle" in str(ei.value) and "safetensors only" in str(ei.value)


@pytest.mark.parametrize("cut", [1, 8, 60])
def test_truncated_file(tmp_path, cut):
    d = save_checkpoint(tmp_path / "c", qwen3_state_dict(n_layers=1))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-cut])
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    assert str(f) in str(ei.value) and "truncated" in str(ei.value)


def test_truncated_inside_the_header(tmp_path):
    d = save_checkpoint(tmp_path / "c", qwen3_state_dict(n_layers=1))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    assert str(f) in str(ei.value) and "header claims" in str(ei.value)


def test_garbage_header_json(tmp_path):
    f = _raw_file(tmp_path / "c" / "model.safetensors", b"{this is not json}", b"\0" * 4)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c")
    assert str(f) in str(ei.value) and "header" in str(ei.value)


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"w": "F32"},
        {"w": {"dtype": "F32", "shape": [2]}},
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}},
        {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        {"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}},
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
        {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}},
        {"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},
    ],
)
def test_malformed_header_entries(tmp_path, header):
    f = _raw_file(tmp_path / "c" / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c")
    assert str(f) in str(ei.value)


def test_byte_count_not_matching_dtype_and_shape(tmp_path):
    header = {"model.layers.0.q.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}}
    f = _raw_file(tmp_path / "c" / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c")
    assert str(f) in str(ei.value) and "model.layers.0.q.weight" in str(ei.value)


def test_header_claiming_more_bytes_than_the_file(tmp_path):
    f = _raw_file(tmp_path / "c" / "model.safetensors", {}, n=10**6)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c")
    assert str(f) in str(ei.value) and "header claims 1000000 bytes" in str(ei.value)


@pytest.mark.parametrize("size", [0, 5])
def test_file_too_short_for_a_header(tmp_path, size):
    f = tmp_path / "c" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"\1" * size)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(tmp_path / "c")
    assert str(f) in str(ei.value) and f"{size} bytes" in str(ei.value)


def test_trailing_bytes(tmp_path):
    d = save_checkpoint(tmp_path / "c", qwen3_state_dict(n_layers=1))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0\0\0")
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    assert str(f) in str(ei.value) and "trailing bytes" in str(ei.value)


def test_shard_missing(tmp_path):
    sd = qwen3_state_dict(n_layers=1)
    names = list(sd)
    d = write_raw_checkpoint(tmp_path / "c", sd, shards=[names[:3], names[3:7], names[7:]])
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    msg = str(ei.value)
    assert str(d / "model.safetensors.index.json") in msg and "model-00002-of-00003.safetensors" in msg
    assert "missing" in msg


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/x.safetensors", "/tmp/x.safetensors"])
def test_index_pointing_outside_the_directory(tmp_path, shard):
    sd = {"model.layers.0.w.weight": torch.ones(2, 2)}
    d = tmp_path / "c"
    d.mkdir()
    # the file does exist where the index points: it must still be refused
    for target in (tmp_path / "x.safetensors", d / "sub" / "x.safetensors"):
        target.parent.mkdir(exist_ok=True)
        save_file(sd, str(target))
    index = {"metadata": {"total_size": 16}, "weight_map": {"model.layers.0.w.weight": shard}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    assert str(d / "model.safetensors.index.json") in str(ei.value) and shard in str(ei.value)


@pytest.mark.parametrize(
    "text", ["{broken", '{"metadata": {}}', '{"weight_map": ["a"]}', '{"weight_map": {"a": 3}}', "[]"]
)
def test_unreadable_index(tmp_path, text):
    d = tmp_path / "c"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    assert str(d / "model.safetensors.index.json") in str(ei.value)


def test_same_tensor_in_two_unindexed_files(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    save_file({"model.layers.0.w.weight": torch.ones(2, 2), "a": torch.ones(1)}, str(d / "model.safetensors"))
    save_file({"model.layers.0.w.weight": torch.zeros(2, 2)}, str(d / "extra.safetensors"))
    with pytest.raises(CorruptCheckpointError) as ei:
        open_checkpoint(d)
    msg = str(ei.value)
    assert str(d) in msg and "model.layers.0.w.weight" in msg
    assert "model.safetensors" in msg and "extra.safetensors" in msg


def test_unindexed_files_are_all_read(tmp_path):
    # without an index every *.safetensors in the directory is part of the checkpoint
    d = tmp_path / "c"
    d.mkdir()
    save_file({"a": torch.ones(2, 2)}, str(d / "part-a.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "part-b.safetensors"))
    ckpt = open_checkpoint(d)
    assert {k: v.file.name for k, v in ckpt.tensors.items()} == {"a": "part-a.safetensors", "b": "part-b.safetensors"}


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_quantized_tensor_in_an_analysed_position(tmp_path, dtype, name):
    sd = qwen3_state_dict(n_layers=1)
    q = "model.layers.0.self_attn.q_proj.weight"
    sd[q] = torch.ones(sd[q].shape).to(dtype)
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "c", sd))
    assert ckpt.tensors[q].dtype == name
    plan = ckpt.plan().by_key()
    with pytest.raises(UnsupportedTensorError) as ei:
        ckpt.read_matrix(plan[0, "self_attn.q_proj"])
    msg = str(ei.value)
    assert str(ckpt.tensors[q].file) in msg and q in msg and name in msg
    # the other matrices are still readable
    ref = plan[0, "self_attn.k_proj"]
    assert torch.equal(ckpt.read_matrix(ref), sd[ref.tensor])


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("which", ["header", "index", "trainer_state", "config"])
def test_deeply_nested_json_gives_an_opd_lens_error(tmp_path, which):
    # json.loads raises RecursionError (not ValueError) on deeply nested input: it must not escape as such
    d = save_checkpoint(tmp_path / "c", qwen3_state_dict(n_layers=1), config=QWEN3_CONFIG, step=3)
    deep = _nested(200_000)
    if which == "header":
        _raw_file(d / "model.safetensors", deep.encode())
    elif which == "index":
        (d / "model.safetensors.index.json").write_text(deep)
    else:
        (d / f"{which}.json").write_text(deep)
    try:
        ckpt = open_checkpoint(d)
        ckpt.plan()
    except OpdLensError:
        pass


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", '{"num_attention_heads": "4", "num_key_value_heads": 2}'],
    ids=["not-an-object", "string-head-count"],
)
def test_malformed_config_json(tmp_path, text):
    # valid JSON that is not a usable config: to be ignored (as an unreadable one is) or refused with a
    # CheckpointError, never a raw AttributeError/TypeError
    sd = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.ones(Q + 2 * KV, H),
        "model.layers.0.o.weight": torch.ones(H, H),
    }
    d = save_checkpoint(tmp_path / "c", sd)
    (d / "config.json").write_text(text)
    ckpt = open_checkpoint(d)
    try:
        plan = ckpt.plan()
    except CheckpointError:
        return
    assert (0, "o") in plan.by_key()


# --- matched_matrices ------------------------------------------------------------------------------------------


def test_matched_matrices_same_model(tmp_path):
    origin = open_checkpoint(save_checkpoint(tmp_path / "o", qwen3_state_dict(seed=0), config=QWEN3_CONFIG))
    ckpt = open_checkpoint(
        save_checkpoint(tmp_path / "t", qwen3_state_dict(seed=1), config=QWEN3_CONFIG, max_shard_bytes=2000)
    )
    refs = matched_matrices(origin, ckpt)
    assert len(refs) == 14
    assert refs == list(ckpt.plan().matrices)
    assert [(r.layer, r.module) for r in refs] == sorted((r.layer, r.module) for r in refs)
    assert len(matched_matrices(origin, ckpt, include_globals=True)) == 16


def test_matched_matrices_shape_mismatch(tmp_path):
    sd = qwen3_state_dict()
    origin = open_checkpoint(save_checkpoint(tmp_path / "o", sd))
    sd2 = dict(sd)
    name = "model.layers.1.mlp.up_proj.weight"
    sd2[name] = torch.zeros(20, 16, dtype=torch.bfloat16)
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "t", sd2))
    with pytest.raises(ShapeMismatchError) as ei:
        matched_matrices(origin, ckpt)
    msg = str(ei.value)
    assert name in msg
    assert str(origin.tensors[name].file) in msg and str(ckpt.tensors[name].file) in msg
    assert "(20, 16)" in msg and "(24, 16)" in msg


@pytest.mark.parametrize("missing_in", ["origin", "checkpoint"])
def test_matched_matrices_missing_on_one_side(tmp_path, missing_in):
    sd = qwen3_state_dict()
    name = "model.layers.1.self_attn.o_proj.weight"
    less = {k: v for k, v in sd.items() if k != name}
    o_sd, t_sd = (less, sd) if missing_in == "origin" else (sd, less)
    origin = open_checkpoint(save_checkpoint(tmp_path / "o", o_sd))
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "t", t_sd))
    with pytest.raises(CheckpointError) as ei:
        matched_matrices(origin, ckpt)
    msg = str(ei.value)
    assert name in msg and str(origin.path) in msg and str(ckpt.path) in msg
    lacking = origin if missing_in == "origin" else ckpt
    assert msg.startswith(str(lacking.path))


def test_matched_matrices_global_missing_only_matters_when_included(tmp_path):
    sd = qwen3_state_dict()
    origin = open_checkpoint(save_checkpoint(tmp_path / "o", sd))
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "t", {k: v for k, v in sd.items() if k != "lm_head.weight"}))
    assert len(matched_matrices(origin, ckpt)) == 14
    with pytest.raises(CheckpointError, match="lm_head"):
        matched_matrices(origin, ckpt, include_globals=True)


def test_matched_matrices_per_expert_origin_vs_fused_checkpoint(tmp_path):
    # transformers v4 wrote per-expert tensors, v5 writes fused 3-D ones: the same (layer, module) keys
    n_exp, inter, hidden = 3, 6, 4
    fused = random_state_dict(
        {
            "model.layers.0.mlp.experts.gate_up_proj": (n_exp, 2 * inter, hidden),
            "model.layers.0.mlp.experts.down_proj": (n_exp, hidden, inter),
        },
        dtype=torch.float32,
    )
    per_expert = {}
    for e in range(n_exp):
        gu = fused["model.layers.0.mlp.experts.gate_up_proj"][e]
        per_expert[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"] = gu[:inter]
        per_expert[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = gu[inter:]
        per_expert[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] = fused["model.layers.0.mlp.experts.down_proj"][
            e
        ]
    origin = open_checkpoint(save_checkpoint(tmp_path / "o", per_expert))
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "t", fused))
    refs = matched_matrices(origin, ckpt)
    assert len(refs) == 3 * n_exp
    o_refs = origin.plan().by_key()
    for r in refs:
        assert torch.equal(ckpt.read_matrix(r), origin.read_matrix(o_refs[r.layer, r.module]))


def test_duplicate_keys_in_a_checkpoint_are_a_corrupt_checkpoint(tmp_path):
    sd = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.zeros(12, 4),
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
    }
    ckpt = open_checkpoint(save_checkpoint(tmp_path / "c", sd))
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.plan()
    assert str(ckpt.path) in str(ei.value) and "self_attn.q_proj" in str(ei.value)


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and everything under it ``seconds`` into the past."""
    for p in [path, *path.rglob("*")]:
        t = p.stat().st_mtime - seconds
        os.utime(p, (t, t))


def test_reopening_an_unchanged_checkpoint_reuses_it_and_any_change_reopens(tmp_path):
    path = save_checkpoint(
        tmp_path / "ckpt", random_state_dict({"model.layers.0.mlp.up_proj.weight": (32, 16)}, seed=0), step=5
    )
    fresh = open_checkpoint(path)
    assert open_checkpoint(path) is not fresh  # just written: a rewrite within the timestamp granularity could hide
    _age(path, 60)
    first = open_checkpoint(path)
    assert open_checkpoint(path) is first
    fingerprint = first.fingerprint
    save_checkpoint(
        path, random_state_dict({"model.layers.0.mlp.up_proj.weight": (32, 16)}, seed=1), step=5
    )  # rewritten in place, same size and names
    again = open_checkpoint(path)
    assert again is not first and again.fingerprint != fingerprint
    _age(path, 60)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
