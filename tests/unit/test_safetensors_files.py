"""formats.safetensors_files: every damaged file or index is named before loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fp8_backend.formats.checkpoint import CheckpointFormatError
from fp8_backend.formats.safetensors_files import INDEX, check_safetensors_files


@pytest.fixture()
def sharded(tmp_path):
    save_file({"a": torch.zeros(64), "b": torch.ones(8)}, tmp_path / "s1.safetensors")
    save_file({"c": torch.zeros(32)}, tmp_path / "s2.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors",
                                                             "c": "s2.safetensors"}}))
    return tmp_path


def test_intact_sharded_model(sharded):
    assert check_safetensors_files(sharded) == {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}


def test_truncated_shard_named(sharded):
    f = sharded / "s2.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointFormatError, match=r"s2\.safetensors: expected a complete safetensors file.*truncated or corrupt"):
        check_safetensors_files(sharded)


def test_index_naming_missing_shard(sharded):
    (sharded / "s2.safetensors").unlink()
    with pytest.raises(CheckpointFormatError, match=r"expected shard file .*s2.safetensors \(the index names it for 1 tensors, e.g. c\), found no such file"):
        check_safetensors_files(sharded)


def test_tensor_stored_twice(sharded):
    save_file({"c": torch.zeros(32), "a": torch.zeros(64)}, sharded / "s2.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"^a: expected in one file, found stored twice, in .*s1\.safetensors and in .*s2\.safetensors"):
        check_safetensors_files(sharded)


def test_index_pointing_to_wrong_shard(sharded):
    (sharded / INDEX).write_text(json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s1.safetensors",
                                                            "c": "s2.safetensors"}}))
    with pytest.raises(CheckpointFormatError, match=r"tensor a: expected in 's2.safetensors' as the index says, found it in s1.safetensors"):
        check_safetensors_files(sharded)


def test_index_not_json(sharded):
    (sharded / INDEX).write_text("{not json")
    with pytest.raises(CheckpointFormatError, match=r"index\.json: expected JSON with a 'weight_map' object"):
        check_safetensors_files(sharded)


def test_unindexed_directory_checks_every_file(tmp_path):
    save_file({"a": torch.zeros(4)}, tmp_path / "model.safetensors")
    (tmp_path / "extra.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointFormatError, match=r"extra\.safetensors: expected a complete safetensors file"):
        check_safetensors_files(tmp_path)
