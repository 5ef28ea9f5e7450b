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


# ----------------------------------------------------------------------------- typos and intervals

import dataclasses  # noqa: E402
import typing  # noqa: E402

from tiny import tiny_config  # noqa: E402


def _write_config(tmp_path, body: str):
    path = tmp_path / "cfg.py"
    path.write_text("from memjax.config import Config\n\n\ndef get_config():\n    c = Config()\n"
                    + "".join(f"    {line}\n" for line in body.splitlines()) + "    return c\n")
    return path


def test_misspelled_key_in_a_config_file_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.dmodel' \(did you mean 'model.d_model'\?\)"):
        load_config(_write_config(tmp_path, "c.model.dmodel = 64"))
    with pytest.raises(ConfigError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        load_config(_write_config(tmp_path, "c.trian = 3"))
    with pytest.raises(ConfigError, match=r"'train.log_evry' \(did you mean 'train.log_every'\?\)"):
        load_config("configs/mqar_tiny.py", ["train.log_evry=5"])


def test_wrong_type_in_a_config_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'train.steps' expects an int, got '100'"):
        load_config(_write_config(tmp_path, "c.train.steps = '100'"))
    with pytest.raises(ConfigError, match=r"config key 'model.scan_layers' expects a bool"):
        load_config(_write_config(tmp_path, "c.model.scan_layers = 1"))


def _wrong_value(hint):
    """A value of the wrong type for a field of type ``hint``."""
    args = set(typing.get_args(hint)) or {hint}
    if str in args or dict in args:
        return "3" if dict in args else "[1]"  # a list for a str, an int for a dict
    return "'abc'"


@pytest.mark.parametrize("section", ["model", "data", "optim", "mesh", "train"])
def test_every_key_with_a_wrong_type_is_rejected_naming_it(section):
    obj = getattr(Config(), section)
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}"
        with pytest.raises(ConfigError, match=rf"config key '{key}' expects"):
            apply_overrides(Config(), [f"{key}={_wrong_value(hints[f.name])}"])


@pytest.mark.parametrize("key", ["log_every", "eval_every", "checkpoint_every"])
@pytest.mark.parametrize("value", [0, -5])
def test_zero_or_negative_interval_is_rejected_before_anything_runs(key, value):
    with pytest.raises(ConfigError, match=rf"'train.{key}' must be a positive number of steps, or None"):
        load_config("configs/mqar_tiny.py", [f"train.{key}={value}"])


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("configs/mqar_tiny.py", ["train.log_every=0", "optim.b1=2", "model.d_model=-2"])
    msg = str(err.value)
    assert msg.startswith("4 problems in the config:")
    for fragment in ("'train.log_every'", "'optim.b1' must be in [0, 1]", "'model.d_model' must be positive"):
        assert fragment in msg


def test_intervals_set_to_none_switch_the_periodic_action_off(tmp_path):
    from memjax.train.loop import train_and_evaluate

    cfg = tiny_config("A,F", steps=3)
    cfg.train.log_every = cfg.train.eval_every = cfg.train.checkpoint_every = None
    validate(cfg)
    out = train_and_evaluate(cfg, str(tmp_path))
    assert out["step"] == 3 and "accuracy" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
