import pytest

from memjax.config import Config, ConfigError, apply_overrides, load_config, validate


def test_overrides_parse_and_type_check():
    cfg = Config()
    apply_overrides(cfg, ["model.d_model=128", "optim.learning_rate=1e-3", "model.pattern=A,F",
                          "train.progress=false", "optim.weight_decay=0"])
    assert cfg.model.d_model == 128 and cfg.model.pattern == "A,F" and cfg.train.progress is False
    assert isinstance(cfg.optim.weight_decay, float)


@pytest.mark.parametrize("override,fragment", [
    (["model.d_modle=3"], "unknown config key 'model.d_modle'"),
    (["modle.d_model=3"], "unknown config key 'modle'"),
    (["model.d_model=abc"], "'model.d_model' expects an int"),
    (["model.d_model=1.5"], "'model.d_model' expects an int"),
    (["train.progress=3"], "'train.progress' expects a bool"),
    (["model.d_model"], "not of the form key.path=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(Config(), override)


@pytest.mark.parametrize("override,fragment", [
    ("model.num_heads=3", "model.num_heads"),
    ("model.pattern=A,Q", "unknown block 'Q'"),
    ("train.microbatches=3", "train.microbatches"),
    ("data.seq_len=4", "data.seq_len"),
    ("data.task=nope", "unknown task 'nope'"),
    ("model.compute_dtype=float8", "model.compute_dtype"),
    ("model.vocab_size=16", "model.vocab_size"),
])
def test_inconsistent_values_fail_validation(override, fragment):
    cfg = Config()
    apply_overrides(cfg, [override])
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


def test_block_and_task_options_are_checked():
    cfg = Config()
    cfg.model.blocks = {"attention": {"windw": 4}}
    with pytest.raises(ConfigError, match="model.blocks.attention.windw"):
        validate(cfg)
    cfg = Config()
    cfg.data.options = {"num_kv_pair": 4}
    with pytest.raises(ConfigError, match="data.options.num_kv_pair"):
        validate(cfg)


def test_batch_must_divide_data_parallel_size():
    cfg = Config()
    cfg.train.batch_size = 12
    validate(cfg, num_devices=1)
    with pytest.raises(ConfigError, match="data-parallel size 8"):
        validate(cfg, num_devices=8)


def test_mesh_must_match_device_count():
    cfg = Config()
    cfg.mesh.data, cfg.mesh.tensor = 3, 1
    with pytest.raises(ConfigError, match="does not match the 8 available devices"):
        validate(cfg, num_devices=8)


def test_shipped_configs_load(tmp_path):
    import glob

    for path in sorted(glob.glob("configs/*.py")):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")
