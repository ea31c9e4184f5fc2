"""Run configs: schema defaults < YAML base chain < variant YAML < dotted CLI overrides, with named errors."""

import dataclasses
from dataclasses import dataclass, field

import pytest

from jaxvision.errors import ConfigError
from jaxvision.train.config import (
    CheckpointSection,
    LogSection,
    MeshSection,
    ModelSection,
    TrainSection,
    format_config,
    load_config,
    require,
    save_resolved,
    to_yaml,
)


@dataclass(frozen=True, kw_only=True)
class _Data:
    train_dir: str
    image_size: int = 224
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        require(self.image_size >= 1, "image_size", self.image_size, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class _Run:
    """A test-only trainer schema composed from the generic sections, like the real trainers'."""

    output_dir: str
    model: ModelSection
    train: TrainSection
    data: _Data
    mesh: MeshSection = field(default_factory=MeshSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


_BASE = """\
output_dir: /runs/base
model:
  path: /models/vit
train:
  max_steps: 100
  batch_size: 32
  learning_rate: 1.0e-3
  freeze: [embeddings]
data:
  train_dir: /data/train
  image_size: 224
log:
  every_steps: 5
"""


@pytest.fixture
def configs(tmp_path):
    """configs/base.yaml and configs/vit/variant.yaml, the variant extending the base through `base:`."""
    (tmp_path / "configs" / "vit").mkdir(parents=True)
    (tmp_path / "configs" / "base.yaml").write_text(_BASE)
    variant = tmp_path / "configs" / "vit" / "variant.yaml"
    variant.write_text("base: ../base.yaml\ntrain:\n  max_steps: 500\n  seed: 7\ndata:\n  image_size: 384\n")
    return variant


def test_base_variant_and_cli_merge_in_order(configs):
    cfg = load_config(_Run, configs, ["train.learning_rate=2e-4", "mesh.fsdp=2", "output_dir=/runs/x"])
    assert isinstance(cfg, _Run) and isinstance(cfg.train, TrainSection) and isinstance(cfg.data, _Data)
    # variant over base, key by key inside a section: siblings from the base survive
    assert cfg.train.max_steps == 500 and cfg.train.seed == 7 and cfg.train.batch_size == 32
    assert cfg.data.image_size == 384 and cfg.data.train_dir == "/data/train"
    # CLI over everything, YAML scalars converted to the schema's types
    assert cfg.train.learning_rate == pytest.approx(2e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.mesh == MeshSection(data=-1, fsdp=2, tensor=1)
    assert cfg.output_dir == "/runs/x"
    # untouched values are the schema defaults, and the base's list survives
    assert cfg.checkpoint == CheckpointSection() and cfg.log.every_steps == 5 and cfg.log.wandb is False
    assert cfg.train.freeze == ("embeddings",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.max_steps = 1  # type: ignore[misc]


def test_base_chain_of_three_files(tmp_path, configs):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {configs}\ntrain:\n  batch_size: 64\n")
    cfg = load_config(_Run, child, [])
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.model.path) == (64, 500, "/models/vit")


def test_lists_parse_from_command_line_and_replace_the_base(configs):
    cfg = load_config(_Run, configs, ["train.freeze=[a, 'b\\.c']", "data.mean=[0.1, 0.2, 0.3]"])
    assert cfg.train.freeze == ("a", "b\\.c")
    assert cfg.data.mean == (0.1, 0.2, 0.3)
    assert load_config(_Run, configs, ["train.freeze=[]"]).train.freeze == ()


def test_unknown_key_in_yaml_names_key_and_file(tmp_path, configs):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"base: {configs}\ntrain:\n  max_step: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Run, bad, [])
    assert "train.max_step" in str(e.value) and str(bad) in str(e.value)
    assert "did you mean 'train.max_steps'" in str(e.value)


def test_unknown_top_level_key_in_base_names_the_base_file(tmp_path, configs):
    base = configs.parent.parent / "base.yaml"
    base.write_text(_BASE + "trainer: x\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*unknown config key 'trainer'"):
        load_config(_Run, configs, [])


def test_unknown_dotted_key_names_command_line(configs):
    with pytest.raises(ConfigError, match=r"command line: train\.lr=1.*unknown config key 'train\.lr'"):
        load_config(_Run, configs, ["train.lr=1"])


def test_wrong_type_names_key_and_source(tmp_path, configs):
    with pytest.raises(ConfigError, match=r"command line: train\.max_steps=abc.*'train\.max_steps'.*Integer"):
        load_config(_Run, configs, ["train.max_steps=abc"])
    bad = tmp_path / "type.yaml"
    bad.write_text(f"base: {configs}\nlog:\n  tensorboard: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Run, bad, [])
    assert str(bad) in str(e.value) and "log.tensorboard" in str(e.value)
    with pytest.raises(ConfigError, match=r"'train' is a section"):
        load_config(_Run, configs, ["train=3"])


def test_section_validation_names_key_and_source(configs):
    with pytest.raises(ConfigError, match=r"command line: train\.max_steps=0.*train\.max_steps=0: must be >= 1"):
        load_config(_Run, configs, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps=5: must divide train\.batch_size=32"):
        load_config(_Run, configs, ["train.grad_accum_steps=5"])
    with pytest.raises(ConfigError, match=r"mesh\.data=0.*command line: mesh\.data=0"):
        load_config(_Run, configs, ["mesh.data=0"])
    configs.write_text(configs.read_text().replace("image_size: 384", "image_size: 0"))
    with pytest.raises(ConfigError, match=r"variant\.yaml: invalid value data\.image_size=0"):
        load_config(_Run, configs, [])


def test_missing_required_value_names_key(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("output_dir: /r\nmodel:\n  path: /m\ntrain:\n  max_steps: 1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(_Run, partial, [])
    message = str(e.value)
    assert "'train.batch_size'" in message and "'data.train_dir'" in message and str(partial) in message
    assert "model.path" not in message
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(f"base: {partial}\ntrain:\n  batch_size: 2\ndata:\n  train_dir: ???\n")
    with pytest.raises(ConfigError, match=r"'data\.train_dir'"):
        load_config(_Run, explicit, [])
    assert load_config(_Run, explicit, ["data.train_dir=/d"]).data.train_dir == "/d"


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("output_dir: /r\ntrain:\n  max_steps: [1, 2\n  batch_size: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml, line 4"):
        load_config(_Run, bad, [])
    with pytest.raises(ConfigError, match=r"must be a mapping"):
        bad.write_text("- a\n- b\n")
        load_config(_Run, bad, [])


def test_base_errors_name_the_referring_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml not found \(named by 'base:' in .*a\.yaml\)"):
        load_config(_Run, a, [])
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle"):
        load_config(_Run, a, [])
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml not found"):
        load_config(_Run, tmp_path / "missing.yaml", [])


def test_malformed_override_is_named(configs):
    with pytest.raises(ConfigError, match=r"command line: train\.max_steps: .*key=value"):
        load_config(_Run, configs, ["train.max_steps"])


def test_save_resolved_round_trips(tmp_path, configs):
    cfg = load_config(_Run, configs, ["train.freeze=[a, b]", "train.clip_norm=null", "mesh.tensor=2"])
    path = save_resolved(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert "base:" not in path.read_text()
    assert load_config(_Run, path, []) == cfg
    assert to_yaml(cfg).splitlines()[0] == "output_dir: /runs/base"  # schema order, not sorted
    text = format_config(cfg)
    assert text.startswith("_Run (resolved):") and "    max_steps: 500" in text


def test_defaults_only_with_overrides():
    cfg = load_config(
        _Run,
        None,
        [
            "output_dir=/o",
            "model.path=/m",
            "train.max_steps=1",
            "train.batch_size=1",
            "train.learning_rate=0.1",
            "data.train_dir=/d",
        ],
    )
    assert cfg.log == LogSection() and cfg.train.optimizer == "adamw" and cfg.model.param_dtype == "float32"
