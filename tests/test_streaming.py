import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from upcycle.errors import CheckpointError, MergeError
from upcycle.merging import MERGE_METHODS, merge_safetensors_files, merge_task_vectors

OPTIONS = {
    "average": {},
    "task_arithmetic": {"coefficient": 0.3},
    "ties": {"coefficient": 0.7, "density": 0.4},
    "dare_task_arithmetic": {"coefficient": 0.5, "density": 0.3},
    "dare_ties": {"coefficient": 0.9, "density": 0.6},
}


def random_experts(count=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "encoder.layer.0.weight": torch.randn(16, 12, generator=generator).to(dtype),
            "encoder.layer.0.bias": torch.randn(16, generator=generator).to(dtype),
            "embeddings.weight": torch.randn(30, 12, generator=generator).to(dtype),
        }
        for _ in range(count)
    ]


def save_experts(folder, experts):
    paths = []
    for index, expert in enumerate(experts):
        path = folder / f"expert{index}.safetensors"
        save_file(expert, str(path))
        paths.append(path)
    return paths


def test_options_cover_every_method():
    assert set(OPTIONS) == set(MERGE_METHODS)


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_streamed_equals_in_memory(tmp_path, method):
    experts = random_experts()
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    merge_safetensors_files(paths, out, method, seed=4, **OPTIONS[method])
    streamed = load_file(str(out))
    in_memory = merge_task_vectors(experts, method, seed=4, **OPTIONS[method])
    assert set(streamed) == set(in_memory)
    for key in in_memory:
        assert torch.equal(streamed[key], in_memory[key]), key


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_streamed_equals_in_memory_bfloat16(tmp_path, method):
    experts = random_experts(dtype=torch.bfloat16)
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    merge_safetensors_files(paths, out, method, seed=2, **OPTIONS[method])
    streamed = load_file(str(out))
    in_memory = merge_task_vectors(experts, method, seed=2, **OPTIONS[method])
    for key in in_memory:
        assert streamed[key].dtype == torch.bfloat16, key
        assert torch.equal(streamed[key], in_memory[key]), key


def test_metadata_written(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    out = tmp_path / "merged.safetensors"
    merge_safetensors_files(paths, out, "average", metadata={"method": "average", "step": "100"})
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"method": "average", "step": "100"}


def test_no_temporary_file_left(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    out = tmp_path / "out" / "merged.safetensors"
    merge_safetensors_files(paths, out, "average")
    assert [path.name for path in out.parent.iterdir()] == ["merged.safetensors"]


def test_existing_output_replaced(tmp_path):
    experts = random_experts(count=2)
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old contents")
    merge_safetensors_files(paths, out, "task_arithmetic", coefficient=0.5)
    merged = load_file(str(out))
    expected = 0.5 * (experts[0]["embeddings.weight"] + experts[1]["embeddings.weight"])
    torch.testing.assert_close(merged["embeddings.weight"], expected)


def test_failed_merge_keeps_old_output(tmp_path):
    experts = random_experts(count=2)
    experts[1]["embeddings.weight"][0, 0] = float("inf")
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old contents")
    with pytest.raises(MergeError):
        merge_safetensors_files(paths, out, "average")
    assert out.read_bytes() == b"old contents"


def test_error_no_files(tmp_path):
    with pytest.raises(MergeError, match=r"no experts to merge"):
        merge_safetensors_files([], tmp_path / "merged.safetensors", "average")


def test_error_unknown_method(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    with pytest.raises(MergeError, match=r"unknown merging method 'soup'. Supported methods"):
        merge_safetensors_files(paths, tmp_path / "merged.safetensors", "soup")


def test_error_missing_file(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=1))
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(
        CheckpointError, match=r"task vector file .*absent.safetensors is missing, corrupt"
    ):
        merge_safetensors_files([paths[0], missing], tmp_path / "merged.safetensors", "average")


def test_error_corrupt_file(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=1))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match=r"corrupt.safetensors is missing, corrupt"):
        merge_safetensors_files([paths[0], corrupt], tmp_path / "merged.safetensors", "average")


def test_error_key_mismatch_from_header(tmp_path):
    experts = random_experts(count=2)
    del experts[1]["encoder.layer.0.bias"]
    paths = save_experts(tmp_path, experts)
    with pytest.raises(
        MergeError,
        match=r"expert 'trec' has other parameters than expert 'sst2': missing 1 "
        r"\('encoder.layer.0.bias'\)",
    ):
        merge_safetensors_files(
            paths, tmp_path / "merged.safetensors", "average", names=["sst2", "trec"]
        )


def test_error_default_names_are_paths(tmp_path):
    experts = random_experts(count=2)
    experts[1]["extra"] = torch.zeros(1)
    paths = save_experts(tmp_path, experts)
    with pytest.raises(MergeError, match=r"expert '.*expert1.safetensors' has other parameters"):
        merge_safetensors_files(paths, tmp_path / "merged.safetensors", "average")


def test_error_shape_mismatch_from_header(tmp_path):
    experts = random_experts(count=2)
    experts[1]["embeddings.weight"] = torch.zeros(31, 12)
    paths = save_experts(tmp_path, experts)
    with pytest.raises(
        MergeError,
        match=r"tensor 'embeddings.weight' has shape \(30, 12\) in expert 'sst2' but "
        r"\(31, 12\) in expert 'trec'",
    ):
        merge_safetensors_files(
            paths, tmp_path / "merged.safetensors", "average", names=["sst2", "trec"]
        )


def test_error_density_out_of_range(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\], got 0.0"):
        merge_safetensors_files(paths, tmp_path / "merged.safetensors", "ties", density=0.0)


def test_error_coefficient_not_finite(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    with pytest.raises(MergeError, match=r"scaling coefficient must be finite, got nan"):
        merge_safetensors_files(
            paths, tmp_path / "merged.safetensors", "ties", coefficient=float("nan")
        )


def test_error_non_finite_expert_named(tmp_path):
    experts = random_experts(count=2)
    experts[1]["embeddings.weight"][0, 0] = float("nan")
    paths = save_experts(tmp_path, experts)
    with pytest.raises(
        MergeError,
        match=r"merged tensor 'embeddings.weight' contains NaN or inf because expert\(s\) "
        r"'trec' contain",
    ):
        merge_safetensors_files(
            paths, tmp_path / "merged.safetensors", "average", names=["sst2", "trec"]
        )


def test_error_metadata_not_string(tmp_path):
    paths = save_experts(tmp_path, random_experts(count=2))
    with pytest.raises(MergeError, match=r"metadata entry 'step': 100 is not a pair of strings"):
        merge_safetensors_files(
            paths, tmp_path / "merged.safetensors", "average", metadata={"step": 100}
        )


def large_experts(count=4, dtype=torch.float32):
    """Experts whose first parameter spans several blocks of 64 elements."""
    generator = torch.Generator().manual_seed(7)
    return [
        {
            "embeddings.weight": torch.randn(40, 6, generator=generator).to(dtype),
            "encoder.layer.0.weight": torch.randn(9, 7, generator=generator).to(dtype),
            "encoder.layer.0.bias": torch.randn(50, generator=generator).to(dtype),
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    ("method", "dtype"),
    [
        ("average", torch.float32),
        ("average", torch.bfloat16),
        ("task_arithmetic", torch.float32),
        ("task_arithmetic", torch.bfloat16),
        ("ties", torch.float32),
    ],
)
def test_blocked_merge_equals_in_memory(tmp_path, method, dtype):
    experts = large_experts(dtype=dtype)
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    merge_safetensors_files(paths, out, method, block_elements=64, **OPTIONS[method])
    streamed = load_file(str(out))
    in_memory = merge_task_vectors(experts, method, **OPTIONS[method])
    assert list(streamed) == sorted(in_memory)
    for key in in_memory:
        assert streamed[key].dtype == dtype, key
        assert torch.equal(streamed[key], in_memory[key]), key


def test_blocked_ties_keeps_nothing_at_low_density(tmp_path):
    experts = large_experts(count=2)
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    # 0.001 of 240 elements rounds down to no element kept, as in PEFT.
    merge_safetensors_files(paths, out, "ties", density=0.001, block_elements=64)
    in_memory = merge_task_vectors(experts, "ties", density=0.001)
    streamed = load_file(str(out))
    assert torch.count_nonzero(streamed["embeddings.weight"]) == 0
    for key in in_memory:
        assert torch.equal(streamed[key], in_memory[key]), key


def test_blocked_merge_names_non_finite_expert(tmp_path):
    experts = large_experts(count=3)
    experts[1]["embeddings.weight"][30, 2] = float("nan")
    paths = save_experts(tmp_path, experts)
    with pytest.raises(MergeError, match=r"expert\(s\) '.*expert1.safetensors'"):
        merge_safetensors_files(paths, tmp_path / "merged.safetensors", "task_arithmetic", block_elements=64)


def test_block_elements_must_be_positive(tmp_path):
    paths = save_experts(tmp_path, large_experts(count=2))
    with pytest.raises(MergeError, match="block_elements is 0"):
        merge_safetensors_files(paths, tmp_path / "merged.safetensors", "average", block_elements=0)


def test_blocked_ties_differs_only_at_threshold_ties(tmp_path):
    # bfloat16 keeps 8 bits of mantissa, so equal magnitudes at the trim threshold are
    # common. topk keeps some of them, and the blocked trim keeps all of them.
    experts = large_experts(dtype=torch.bfloat16)
    paths = save_experts(tmp_path, experts)
    out = tmp_path / "merged.safetensors"
    merge_safetensors_files(paths, out, "ties", block_elements=64, **OPTIONS["ties"])
    streamed = load_file(str(out))["embeddings.weight"]
    in_memory = merge_task_vectors(experts, "ties", **OPTIONS["ties"])["embeddings.weight"]
    magnitudes = torch.stack([expert["embeddings.weight"].float().abs() for expert in experts])
    keep = int(OPTIONS["ties"]["density"] * magnitudes[0].numel())
    thresholds = magnitudes.reshape(len(experts), -1).topk(keep, dim=1).values[:, -1]
    at_threshold = (magnitudes == thresholds.view(-1, 1, 1)).any(dim=0)
    differs = streamed != in_memory
    assert bool(differs.any())
    assert bool(at_threshold[differs].all())


@pytest.mark.parametrize("k", [1, 2, 57, 199, 200])
def test_kth_largest_magnitude_matches_topk(k):
    from upcycle.merging.streaming import _kth_largest_magnitude

    generator = torch.Generator().manual_seed(k)
    values = torch.randn(200, generator=generator) * 10.0 ** torch.randint(-8, 4, (200,), generator=generator)
    values[:20] = 0.0
    values[20:30] = values[30:40]  # equal magnitudes
    values[40] = -float("inf")

    def blocks():
        yield from values.split(33)

    expected = torch.topk(values.abs(), k).values[-1]
    assert _kth_largest_magnitude(blocks, k) == float(expected)
