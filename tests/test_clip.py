"""CLIP experts on a tiny CLIP built from a config: zero-shot heads, images, image tasks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from upcycle.config import load_config, parse_config
from upcycle.data import TaskSource, load_task
from upcycle.data.images import encode_images
from upcycle.errors import ConfigError, DataError
from upcycle.evaluation import collate
from upcycle.models.clip import ClipFamily

CLIP_WORDS = [
    "[PAD]",
    "[UNK]",
    "<bos>",
    "<eos>",
    "a",
    "photo",
    "of",
    "the",
    "shade",
    ".",
    "red",
    "green",
    "blue",
    "bright",
    "dark",
]
COLORS = {
    "red": (200, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 60, 210),
    "bright": (235, 235, 225),
    "dark": (25, 20, 30),
}
SPLIT_SIZES = (12, 6, 6)


def word_tokenizer(words: list[str], *, bos: str, eos: str | None = None):
    """Return a fast word-level tokenizer that splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{bos} $A" + (f" {eos}" if eos else "")
    special = [(bos, vocab[bos])] + ([(eos, vocab[eos])] if eos else [])
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=special)
    extra = {"eos_token": eos} if eos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token=bos, **extra
    )


def make_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """Save a random CLIP (32x32 images, 16x16 patches), a tokenizer and an image processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer(CLIP_WORDS, bos="<bos>", eos="<eos>").save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(CLIP_WORDS),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(folder)
    return folder


def color_image(name: str, rng: np.random.Generator, size: tuple[int, int] = (40, 36)):
    """Return a noisy image of one class colour, `size` = (width, height)."""
    from PIL import Image

    noise = rng.normal(0, 20, size=(size[1], size[0], 3))
    pixels = np.clip(np.array(COLORS[name], dtype=np.float64) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_image_folder(folder: Path, classes: list[str], *, seed: int = 0) -> Path:
    """Write an image-folder task: <split>/<class>/<n>.png, classes in turn."""
    rng = np.random.default_rng(seed)
    for split, size in zip(("train", "validation", "test"), SPLIT_SIZES, strict=True):
        for i in range(size):
            name = classes[i % len(classes)]
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            color_image(name, rng).save(folder / split / name / f"{i:03d}.png")
    return folder


def make_image_dataset(folder: Path, classes: list[str], *, seed: int = 1) -> Path:
    """Save a DatasetDict with an Image column 'img' and a ClassLabel column 'label'."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(classes))}
    )
    parts = {}
    for split, size in zip(("train", "validation", "test"), SPLIT_SIZES, strict=True):
        labels = [i % len(classes) for i in range(size)]
        images = [color_image(classes[label], rng, size=(30 + 7 * label, 34)) for label in labels]
        parts[split] = datasets.Dataset.from_dict(
            {"img": images, "label": labels}, features=features
        )
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def clip_config(model_dir: Path, suite: Path, **sections) -> dict:
    """A run config for the tiny CLIP and the two image tasks of `image_suite`."""
    config = {
        "name": "tiny-clip",
        "device": "cpu",
        "data": {
            "root": str(suite),
            "tasks": [
                {"name": "colors", "format": "images"},
                {"name": "tones", "format": "hf", "image_column": "img"},
            ],
        },
        "model": {"family": "clip", "base": str(model_dir)},
    }
    config.update(sections)
    return config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def image_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image-suite")
    make_image_folder(root / "colors", ["red", "green", "blue"])
    make_image_dataset(root / "tones", ["bright", "dark"])
    return root


@pytest.fixture(scope="module")
def family(clip_dir) -> ClipFamily:
    config = parse_config(
        clip_config(clip_dir, clip_dir, data={"tasks": [{"name": "x", "format": "images"}]})
    )
    return ClipFamily(config.model, {"colors": ["a photo of a {}.", "the {} shade ."]})


def hand_text_embedding(clip, tokenizer, prompt: str) -> torch.Tensor:
    """Project one unpadded prompt through CLIP's text tower and normalise it."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        pooled = clip.text_model(input_ids=ids).pooler_output
        return F.normalize(clip.text_projection(pooled)[0], dim=-1)


def test_zero_shot_head_matches_hand_computation(family, image_suite):
    task = load_task(TaskSource(name="colors", format="images"), data_root=image_suite)
    head = family.zero_shot_heads({"colors": task}, torch.device("cpu"))["colors"]
    clip, tokenizer = family.clip_model, family.tokenizer
    expected = []
    for name in task.class_names:
        prompts = [f"a photo of a {name}.", f"the {name} shade ."]
        mean = torch.stack([hand_text_embedding(clip, tokenizer, p) for p in prompts]).mean(0)
        expected.append(F.normalize(mean, dim=-1))
    torch.testing.assert_close(head.class_embeddings, torch.stack(expected), atol=1e-6, rtol=1e-5)
    assert head.logit_scale == pytest.approx(math.exp(clip.logit_scale.item()))


def test_classifier_matches_clip_similarity(family, image_suite):
    task = load_task(TaskSource(name="colors", format="images"), data_root=image_suite)
    head = family.zero_shot_heads({"colors": task}, torch.device("cpu"))["colors"]
    split = family.encode_split(task, "test")
    pixel_values = collate(split, [0, 1, 2, 3], pad_id=0)["pixel_values"]
    classifier = family.classifier(family.base_model, head)
    with torch.no_grad():
        logits, features = classifier(pixel_values=pixel_values)
        clip = family.clip_model
        pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
        image = F.normalize(clip.visual_projection(pooled), dim=-1)
    torch.testing.assert_close(features, image, atol=1e-6, rtol=1e-5)
    expected = head.logit_scale * image @ head.class_embeddings.T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_vision_tower_state_names(family):
    names = list(family.base_model.state_dict())
    assert "visual_projection.weight" in names
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in names)


def test_preprocessing_shape_and_values(family, image_suite):
    task = load_task(TaskSource(name="colors", format="images"), data_root=image_suite)
    split = task.splits["train"]
    encoded = encode_images(family.image_processor, split, task="colors", split_name="train")
    assert encoded.pixels.shape == (12, 3, 32, 32)
    assert encoded.pixels.dtype == torch.uint8
    batch = encoded.collate([0, 5])
    reference = family.image_processor(images=split.images.read([0, 5]), return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(batch["pixel_values"], reference, atol=1e-5, rtol=0)
    assert batch["labels"].tolist() == [split.labels[0], split.labels[5]]


def test_image_folder_loading(image_suite):
    task = load_task(TaskSource(name="colors", format="images"), data_root=image_suite)
    assert task.class_names == ["blue", "green", "red"]
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == list(SPLIT_SIZES)
    train = task.splits["train"]
    folders = [Path(path).parent.name for path in train.texts]
    assert folders == [task.class_names[label] for label in train.labels]
    assert train.images[0].mode == "RGB"
    assert train.images[0].size == (40, 36)


def test_hf_image_dataset_loading(image_suite):
    source = TaskSource(name="tones", format="hf", image_column="img")
    task = load_task(source, data_root=image_suite)
    assert task.class_names == ["bright", "dark"]
    assert task.splits["train"].labels == [0, 1] * 6
    assert task.splits["validation"].images[1].size == (37, 34)


def test_subsample_keeps_images_aligned(image_suite):
    source = TaskSource(name="tones", format="hf", image_column="img")
    task = load_task(source, data_root=image_suite, max_examples={"train": 5}, seed=3)
    train = task.splits["train"]
    assert len(train) == 5
    assert len(train.images) == 5
    assert [train.images.describe(i) for i in range(5)] == train.texts
    rows = [int(text.rsplit(" ", 1)[1]) for text in train.texts]
    assert train.labels == [row % 2 for row in rows]


def test_unknown_class_folder_rejected(tmp_path):
    folder = make_image_folder(tmp_path / "colors", ["red", "green"])
    (folder / "validation" / "purple").mkdir()
    source = TaskSource(name="colors", format="images")
    with pytest.raises(DataError, match=r"folder 'purple' is not a class of task 'colors'"):
        load_task(source, data_root=tmp_path)


def test_non_image_file_rejected(tmp_path):
    folder = make_image_folder(tmp_path / "colors", ["red", "green"])
    (folder / "train" / "red" / "notes.txt").write_text("not an image")
    source = TaskSource(name="colors", format="images")
    with pytest.raises(DataError, match=r"notes.txt: unsupported image file extension '.txt'"):
        load_task(source, data_root=tmp_path)


def test_missing_split_folder_rejected(tmp_path):
    folder = make_image_folder(tmp_path / "colors", ["red", "green"])
    for path in sorted((folder / "test").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (folder / "test").rmdir()
    source = TaskSource(name="colors", format="images")
    with pytest.raises(DataError, match=r"test split folder not found: .*colors/test"):
        load_task(source, data_root=tmp_path)


def test_text_task_rejected_for_clip(clip_dir, image_suite):
    raw = clip_config(clip_dir, image_suite, data={"tasks": ["sst2"]})
    with pytest.raises(
        ConfigError, match=r"model.family clip classifies images, but tasks \['sst2'\]"
    ):
        parse_config(raw)


def test_image_column_needs_hf_format():
    with pytest.raises(ValueError, match="image_column is set but format is 'folder'"):
        TaskSource(name="x", image_column="img")


def test_clip_config_defaults(clip_dir, image_suite):
    config = parse_config(clip_config(clip_dir, image_suite))
    assert config.model.logit_scale == "model"
    assert config.model.prompt_template == "a photo of a {}."
    assert config.training.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
    ]


def test_hf_split_slices(image_suite):
    splits = {"train": "train[:75%]", "validation": "train[75%:]", "test": "test[-2:]"}
    source = TaskSource(name="tones", format="hf", image_column="img", splits=splits)
    task = load_task(source, data_root=image_suite)
    assert len(task.splits["train"]) == 9
    assert task.splits["validation"].labels == [1, 0, 1]
    assert len(task.splits["test"]) == 2
    assert task.splits["validation"].texts[0].endswith("split 'train[75%:]' row 0")


def test_unknown_hf_split_rejected(image_suite):
    source = TaskSource(name="tones", format="hf", image_column="img", splits={"validation": "dev"})
    with pytest.raises(DataError, match=r"has no split 'dev' \(task 'tones'\)"):
        load_task(source, data_root=image_suite)


def test_eight_task_config_file():
    config = load_config(Path(__file__).parents[1] / "configs/clip-vit-b32-8tasks.yaml")
    names = [task.name for task in config.data.tasks]
    assert names == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    assert all(task.is_image_task for task in config.data.tasks)
    assert config.model.family == "clip"
