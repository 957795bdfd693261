from pathlib import Path

import pytest
import yaml

from upcycle.config import load_config, log_spaced_steps, parse_config
from upcycle.errors import ConfigError


def minimal(**sections):
    config = {"data": {"tasks": ["sst2", "trec"]}}
    config.update(sections)
    return config


def test_defaults_fill_every_section():
    config = parse_config(minimal())
    assert config.model.head == "label-embedding"
    assert config.training.methods == ["full"]
    assert config.merging.methods[0] == "average"


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"training\.stpes: unknown key"):
        parse_config(minimal(training={"stpes": 10}))


def test_wrong_type_named():
    with pytest.raises(ConfigError, match=r"training\.batch_size: .*integer.*'many'"):
        parse_config(minimal(training={"batch_size": "many"}))


def test_cross_field_error_named():
    with pytest.raises(ConfigError, match=r"training: warmup_steps \(50\) exceeds steps \(30\)$"):
        parse_config(minimal(training={"steps": 30, "warmup_steps": 50}))


def test_out_of_range_named():
    with pytest.raises(ConfigError, match=r"training\.steps: .*greater than or equal to 1"):
        parse_config(minimal(training={"steps": 0}))


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"model\.head: .*'label-embedding' or 'linear'"):
        parse_config(minimal(model={"head": "mlp"}))


def test_every_error_reported_at_once():
    with pytest.raises(ConfigError) as error:
        parse_config(minimal(training={"steps": -1, "schedule": "step"}))
    assert "training.steps" in str(error.value)
    assert "training.schedule" in str(error.value)


def test_duplicate_task_names():
    with pytest.raises(ConfigError, match=r"duplicate task names \['sst2'\]"):
        parse_config({"data": {"tasks": ["sst2", "sst2"]}})


def test_checkpoint_step_beyond_last():
    with pytest.raises(ConfigError, match=r"checkpoint_steps \[20\] are outside 1..training.steps"):
        parse_config(minimal(training={"steps": 10, "checkpoint_steps": [5, 20]}))


def test_moe_top_k_beyond_experts():
    with pytest.raises(ConfigError, match=r"moe.top_k \(3\) exceeds the number of experts \(2"):
        parse_config(minimal(training={"methods": ["lora"]}, moe={"enabled": True, "top_k": 3}))


def test_prompt_template_needs_slot():
    with pytest.raises(ConfigError, match=r"model\.prompt_template"):
        parse_config(minimal(model={"prompt_template": "a review"}))


def test_log_spaced_steps():
    assert log_spaced_steps(800, 4) == [100, 200, 400, 800]
    assert log_spaced_steps(5, 8) == [1, 2, 5]
    assert log_spaced_steps(10, 1) == [10]


def test_resolved_steps_include_last():
    config = parse_config(minimal(training={"steps": 30, "warmup_steps": 3, "checkpoint_steps": [10, 5]}))
    assert config.training.resolved_checkpoint_steps() == [5, 10, 30]


def test_load_config_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    config = load_config(path, ["training.steps=42", "model.head=linear"])
    assert config.training.steps == 42
    assert config.model.head == "linear"


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_configs_valid():
    for name in ("quick", "textsuite"):
        config = load_config(f"configs/{name}.yaml")
        assert config.name == name


def test_config_reference_page_current():
    import runpy

    script = Path(__file__).resolve().parent.parent / "scripts/config_reference.py"
    reference = runpy.run_path(str(script))["reference"]
    page = script.parent.parent / "docs/config.md"
    assert page.read_text() == reference(), "run python scripts/config_reference.py"
