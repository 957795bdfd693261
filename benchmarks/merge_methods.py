"""Time and peak memory of merging 8 experts of all-MiniLM-L6-v2, per method and tool.

Experts are random task vectors of MiniLM's shapes (Gaussian, standard deviation 1e-3,
float32), saved as safetensors files; LoRA experts are random rank-8 adapters. Each
measured variant runs in its own Python process, which reports:

- seconds: wall time of the merge call alone, after its inputs are loaded (for the file
  to file variants: reading, merging and writing);
- peak MiB: the largest growth of the process's memory over the merge call, sampled
  from /proc/self/status every 2 ms: of its anonymous memory (RssAnon: tensors and
  other heap memory) and of its resident set size (VmRSS), which also counts the
  pages of files mapped into memory. safetensors maps the files it reads, and the kernel
  can drop those clean pages under memory pressure, while anonymous memory must fit.
  In-memory merges are measured from after their inputs are loaded, file to file
  merges from before any expert is read.

Variants:

- upcycle: `merge_task_vectors` on the 8 task vectors in memory.
- peft merge_utils: the same `peft.utils.merge_utils` function called directly in a
  loop over parameters, without upcycle's checks and seeding.
- stream: `merge_safetensors_files`, file to file, one parameter at a time.
- load all: read the 8 files whole, `merge_task_vectors`, write the result.
- mergekit: `mergekit.merge.run_merge` on 8 full-model folders (base + task vector),
  file to file, where mergekit is installed.
- LoRA: upcycle turns each adapter into a task vector (B @ A * alpha / rank) and merges
  those; PEFT's `add_weighted_adapter` merges the adapters loaded into one model.

Run: OMP_NUM_THREADS=1 python benchmarks/merge_methods.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_header, run_child

EXPERTS = 8
COEFFICIENT = 0.5
DENSITY = {
    "average": 1.0,
    "task_arithmetic": 1.0,
    "ties": 0.2,
    "dare_task_arithmetic": 0.1,
    "dare_ties": 0.1,
}
PEFT_FUNCTIONS = {
    "average": "task_arithmetic",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_task_arithmetic": "dare_linear",
    "dare_ties": "dare_ties",
}
MERGEKIT_METHODS = {
    "average": "linear",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_task_arithmetic": "dare_linear",
    "dare_ties": "dare_ties",
}
# PEFT combination type of add_weighted_adapter -> the upcycle method of the same family.
# Only `cat` gives the same merged update as upcycle: PEFT's ties and dare types trim or
# drop the A and B factors separately, and the svd types factor the merged update again.
LORA_PAIRS = {
    "cat": "task_arithmetic",
    "linear": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_task_arithmetic",
    "dare_ties": "dare_ties",
    "ties_svd": "ties",
}
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_TARGETS = [
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


class MemorySampler:
    """Samples RssAnon and VmRSS in a thread every 2 ms; `stop` returns their growth in MiB."""

    def __init__(self) -> None:
        self.start = read_status()
        self.peak = dict(self.start)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while self.running:
            for key, value in read_status().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(0.002)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        for key, value in read_status().items():
            self.peak[key] = max(self.peak[key], value)
        return {
            "peak_mib": self.peak["VmRSS"] - self.start["VmRSS"],
            "peak_anon_mib": self.peak["RssAnon"] - self.start["RssAnon"],
        }


def read_status() -> dict[str, float]:
    """Return VmRSS and RssAnon of this process in MiB, from /proc/self/status."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            values[name] = int(rest.split()[0]) / 1024
    return values


def coefficient(method: str) -> float:
    return 1.0 if method == "average" else COEFFICIENT


def base_path() -> Path:
    from upcycle.models.encoder import resolve_base_model

    return Path(resolve_base_model("all-MiniLM-L6-v2"))


def expert_paths(folder: Path) -> list[Path]:
    return [folder / f"expert{i}.safetensors" for i in range(EXPERTS)]


# Preparation (parent process)


def prepare(folder: Path, *, mergekit: bool) -> None:
    """Write the task vector files, the full-model folders for mergekit and LoRA adapters."""
    from safetensors.torch import load_file, save_file

    base = load_file(str(base_path() / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for index, path in enumerate(expert_paths(folder)):
        task_vector = {
            name: torch.randn(tensor.shape, generator=generator) * 1e-3
            for name, tensor in base.items()
            if tensor.is_floating_point()
        }
        save_file(task_vector, str(path))
        if mergekit:
            model_dir = folder / f"model{index}"
            model_dir.mkdir()
            shutil.copy(base_path() / "config.json", model_dir / "config.json")
            weights = {
                name: tensor + task_vector[name] if name in task_vector else tensor
                for name, tensor in base.items()
            }
            save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
        del task_vector
    prepare_lora(folder)


def prepare_lora(folder: Path) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModel

    model = get_peft_model(
        AutoModel.from_pretrained(base_path()),
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS),
    )
    template = get_peft_model_state_dict(model)
    generator = torch.Generator().manual_seed(1)
    for index in range(EXPERTS):
        adapter = {
            name: torch.randn(tensor.shape, generator=generator) * 0.02
            for name, tensor in template.items()
        }
        save_file(adapter, str(folder / f"adapter{index}.safetensors"))


# Measured variants (one child process each)


def load_vectors(folder: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(path)) for path in expert_paths(folder)]


def measure_upcycle(folder: Path, method: str) -> dict:
    from upcycle.merging import merge_task_vectors

    vectors = load_vectors(folder)
    sampler = MemorySampler()
    started = time.perf_counter()
    merge_task_vectors(vectors, method, coefficient=coefficient(method), density=DENSITY[method])
    return {"seconds": time.perf_counter() - started, **sampler.stop()}


def measure_peft(folder: Path, method: str) -> dict:
    from peft.utils import merge_utils

    vectors = load_vectors(folder)
    sampler = MemorySampler()
    started = time.perf_counter()
    function = getattr(merge_utils, PEFT_FUNCTIONS[method])
    weight = 1.0 / EXPERTS if method == "average" else COEFFICIENT
    weights = torch.full((EXPERTS,), weight)
    torch.manual_seed(0)
    merged = {}
    for key in vectors[0]:
        tensors = [vector[key] for vector in vectors]
        if method in ("average", "task_arithmetic"):
            merged[key] = function(tensors, weights)
        elif method == "dare_task_arithmetic":
            merged[key] = function(tensors, weights, DENSITY[method])
        else:
            merged[key] = function(tensors, weights, DENSITY[method], majority_sign_method="total")
    return {"seconds": time.perf_counter() - started, **sampler.stop()}


def measure_stream(folder: Path, method: str) -> dict:
    from upcycle.merging import merge_safetensors_files

    merge_safetensors_files(
        expert_paths(folder),
        folder / f"stream-{method}.safetensors",
        method,
        coefficient=coefficient(method),
        density=DENSITY[method],
    )
    return {}


def measure_load_all(folder: Path, method: str) -> dict:
    from safetensors.torch import save_file

    from upcycle.merging import merge_task_vectors

    vectors = load_vectors(folder)
    merged = merge_task_vectors(
        vectors, method, coefficient=coefficient(method), density=DENSITY[method]
    )
    save_file(merged, str(folder / f"all-{method}.safetensors"))
    return {}


def mergekit_config(folder: Path, method: str):
    from mergekit.config import MergeConfiguration

    kit_method = MERGEKIT_METHODS[method]
    models = []
    for index in range(EXPERTS):
        parameters = {"weight": coefficient(method)}
        if DENSITY[method] < 1:
            parameters["density"] = DENSITY[method]
        models.append({"model": str(folder / f"model{index}"), "parameters": parameters})
    raw = {"merge_method": kit_method, "models": models, "dtype": "float32"}
    if kit_method != "linear":
        raw["base_model"] = str(base_path())
        raw["parameters"] = {"normalize": False}
    return MergeConfiguration.model_validate(raw)


def measure_mergekit(folder: Path, method: str) -> dict:
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    run_merge(mergekit_config(folder, method), str(folder / f"mergekit-{method}"), options)
    return {}


def load_adapters(folder: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [load_file(str(folder / f"adapter{i}.safetensors")) for i in range(EXPERTS)]


def measure_lora_upcycle(folder: Path, method: str) -> dict:
    from safetensors import safe_open

    from upcycle.merging import merge_task_vectors
    from upcycle.merging.lora import lora_task_vector

    with safe_open(str(base_path() / "model.safetensors"), "pt") as handle:
        base_keys = list(handle.keys())
    adapters = load_adapters(folder)
    started = time.perf_counter()
    vectors = [
        lora_task_vector(adapter, rank=LORA_RANK, alpha=LORA_ALPHA, base_keys=base_keys)
        for adapter in adapters
    ]
    merge_task_vectors(vectors, method, coefficient=COEFFICIENT, density=DENSITY[method])
    return {"seconds": time.perf_counter() - started}


def measure_lora_peft(folder: Path, combination: str) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS)
    model = None
    names = [f"expert{i}" for i in range(EXPERTS)]
    for name, adapter in zip(names, load_adapters(folder)):
        if model is None:
            model = get_peft_model(
                AutoModel.from_pretrained(base_path()), config, adapter_name=name
            )
        else:
            model.add_adapter(name, config)
        set_peft_model_state_dict(model, adapter, adapter_name=name)
    density = DENSITY[LORA_PAIRS[combination]]
    torch.manual_seed(0)
    started = time.perf_counter()
    model.add_weighted_adapter(
        adapters=names,
        weights=[COEFFICIENT] * EXPERTS,
        adapter_name="merged",
        combination_type=combination,
        density=density if density < 1 else None,
        svd_full_matrices=False,
    )
    return {"seconds": time.perf_counter() - started}


MEASURES = {
    "upcycle": measure_upcycle,
    "peft": measure_peft,
    "stream": measure_stream,
    "load-all": measure_load_all,
    "mergekit": measure_mergekit,
    "lora-upcycle": measure_lora_upcycle,
    "lora-peft": measure_lora_peft,
}


def child(variant: str, folder: Path, method: str) -> None:
    """Run one variant and print its seconds and peak memory as a JSON line."""
    import peft.utils.merge_utils  # noqa: F401 - import the libraries before the baseline

    import upcycle.merging  # noqa: F401

    if variant == "mergekit":
        import mergekit.merge  # noqa: F401
    if variant.startswith("lora"):
        import transformers  # noqa: F401

    sampler = MemorySampler()
    started = time.perf_counter()
    measured = MEASURES[variant](folder, method)
    seconds = time.perf_counter() - started
    # In-memory variants measure from after loading their inputs and return their own.
    result = {"seconds": seconds, **sampler.stop(), **measured}
    print(json.dumps(result))


# Report (parent process)


def measure(variant: str, folder: Path, method: str) -> dict:
    try:
        return run_child([__file__, "--child", variant, "--dir", str(folder), "--method", method])
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1]
        return {"error": last_line}


def cell(result: dict) -> str:
    """Format one result as 'seconds / peak MiB', or the error that stopped it."""
    if "error" in result:
        return f"failed: {result['error'][:50]}"
    return f"{result['seconds']:.2f} / {result['peak_anon_mib']:.0f} / {result['peak_mib']:.0f}"


def seconds_cell(result: dict) -> str:
    return f"{result['seconds']:.2f}" if "seconds" in result else cell(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--note", help="a line printed under the header, e.g. other load")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.dir), args.method)
        return

    print_header("merge_methods", "python benchmarks/merge_methods.py", args.note)
    try:
        import mergekit

        has_mergekit = True
        mergekit_note = f"mergekit {getattr(mergekit, '__version__', '(version unknown)')}"
    except ImportError:
        has_mergekit = False
        mergekit_note = "mergekit not installed: its rows are left out"
    import peft

    print(f"peft {peft.__version__}; {mergekit_note}")
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-") as name:
        folder = Path(name)
        prepare(folder, mergekit=has_mergekit)
        model_mib = expert_paths(folder)[0].stat().st_size / 2**20
        print(
            f"{EXPERTS} experts; one task vector file (float32, all of MiniLM's floating "
            f"parameters) is {model_mib:.1f} MiB; coefficient {COEFFICIENT} (1 for average), "
            f"density {DENSITY['ties']} for TIES and {DENSITY['dare_ties']} for DARE"
        )
        print()

        print("Cells: seconds / peak growth of anonymous memory (MiB) / peak growth of RSS (MiB)")
        print()
        print("In memory, 8 task vectors already loaded:")
        print(f"{'method':22s} {'upcycle':>22s} {'peft merge_utils':>22s}")
        for method in DENSITY:
            upcycle = cell(measure("upcycle", folder, method))
            direct = cell(measure("peft", folder, method))
            print(f"{method:22s} {upcycle:>22s} {direct:>22s}", flush=True)
        print()

        print("File to file (read 8 experts, merge, write one file):")
        header = f"{'method':22s} {'stream':>22s} {'load all':>22s}"
        if has_mergekit:
            header += f" {'mergekit':>22s}"
        print(header)
        stream_peaks = {}
        for method in DENSITY:
            stream = measure("stream", folder, method)
            load_all = measure("load-all", folder, method)
            line = f"{method:22s} {cell(stream):>22s} {cell(load_all):>22s}"
            if has_mergekit:
                line += f" {cell(measure('mergekit', folder, method)):>22s}"
            print(line, flush=True)
            if "peak_mib" in stream:
                stream_peaks[method] = (stream["peak_anon_mib"], stream["peak_mib"])
        print()
        print("streamed merge, peak growth in units of one model (target < 2.5 x):")
        for method, (anonymous, resident) in stream_peaks.items():
            ratio = anonymous / model_mib
            print(
                f"  {method:22s} anonymous {ratio:5.2f} x ({'met' if ratio < 2.5 else 'missed'}), "
                f"RSS {resident / model_mib:5.2f} x"
            )
        print()

        print(f"LoRA, {EXPERTS} random rank-{LORA_RANK} adapters: seconds of the merge alone")
        print(f"{'PEFT combination_type':22s} {'PEFT seconds':>13s}   upcycle method: seconds")
        for combination, method in LORA_PAIRS.items():
            direct = seconds_cell(measure("lora-peft", folder, combination))
            upcycle = seconds_cell(measure("lora-upcycle", folder, method))
            print(f"{combination:22s} {direct:>13s}   {method}: {upcycle}", flush=True)


if __name__ == "__main__":
    main()
