"""grpo/config.py: TOML tables into typed dataclasses, key=value overrides, clear errors, and back to TOML."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest

from grpo.advantages import ADVANTAGE_SCALINGS
from grpo.config import ConfigError, build_config, config_differences, load_sections, parse_overrides, to_toml
from grpo.losses import AGGREGATIONS, KL_ESTIMATORS
from grpo.sft import SFTConfig
from grpo.trainer import GRPOConfig

SECTIONS = {"grpo": GRPOConfig, "sft": SFTConfig}


@dataclasses.dataclass
class RunConfig:
    """Field types the library configs do not all have: optional values, strings, booleans."""

    model: str = "tiny"
    out: str | None = None
    seed: int | None = None
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    compile: bool = False


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_tables_fill_their_dataclasses_and_overrides_win(tmp_path):
    path = write(
        tmp_path,
        '[grpo]\nlr = 1e-4\ntotal_steps = 30\nloss_agg = "seq-mean-token-sum-norm"\n\n[sft]\nbatch_size = 4\n',
    )
    configs = load_sections(
        SECTIONS, path, ["grpo.total_steps=5", "sft.lr_schedule=constant", "grpo.kl_coef = 0"]
    )
    grpo, sft = configs["grpo"], configs["sft"]
    assert grpo == dataclasses.replace(
        GRPOConfig(), lr=1e-4, total_steps=5, loss_agg="seq-mean-token-sum-norm", kl_coef=0.0
    )
    assert sft == dataclasses.replace(SFTConfig(), batch_size=4, lr_schedule="constant")
    assert isinstance(grpo.total_steps, int) and isinstance(grpo.kl_coef, float)  # strings converted


def test_no_file_and_no_overrides_gives_the_defaults():
    assert load_sections(SECTIONS) == {"grpo": GRPOConfig(), "sft": SFTConfig()}


def test_unknown_keys_and_tables_are_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"\[grpo\] unknown option\(s\) \['learning_rate'\]"):
        load_sections(SECTIONS, write(tmp_path, "[grpo]\nlearning_rate = 1e-4\n"))
    with pytest.raises(ConfigError, match=r"\[sft\] unknown option\(s\) \['epochs'\]"):
        load_sections(SECTIONS, None, ["sft.epochs=3"])
    with pytest.raises(ConfigError, match=r"unknown config table\(s\) \['grpoo'\]"):
        load_sections(SECTIONS, write(tmp_path, "[grpoo]\nlr = 1.0\n"))
    with pytest.raises(ConfigError, match="unknown config table 'rl' in override"):
        load_sections(SECTIONS, None, ["rl.lr=1"])


@pytest.mark.parametrize("override", ["grpo.lr", "lr=1e-4", "grpo.=3", "=3"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides([override])


def test_override_values_may_contain_equals_signs():
    assert parse_overrides(["run.out=a=b", " run.model = tiny "]) == {"run": {"out": "a=b", "model": "tiny"}}


def test_literal_and_type_validation():
    with pytest.raises(ConfigError, match=r"grpo.loss_agg must be one of \['token-mean'"):
        load_sections(SECTIONS, None, ["grpo.loss_agg=mean"])
    with pytest.raises(ConfigError, match="sft.lr_schedule must be one of"):
        build_config(SFTConfig, {"lr_schedule": "linear"}, section="sft")
    with pytest.raises(ConfigError, match="grpo.total_steps expects int, got 'ten'"):
        load_sections(SECTIONS, None, ["grpo.total_steps=ten"])
    with pytest.raises(ConfigError, match="grpo.lr expects float"):
        load_sections(SECTIONS, None, ["grpo.lr=fast"])
    with pytest.raises(ConfigError, match="compile expects true/false"):
        build_config(RunConfig, {"compile": "maybe"})
    with pytest.raises(ConfigError, match="total_steps expects int, got 2.5"):
        build_config(GRPOConfig, {"total_steps": 2.5})  # a fraction is not silently cut to 2
    with pytest.raises(ConfigError, match="total_steps expects int, got True"):
        build_config(GRPOConfig, {"total_steps": True})
    assert build_config(GRPOConfig, {"total_steps": 3.0}).total_steps == 3


@pytest.mark.parametrize(
    ("field", "registry"),
    [("loss_agg", AGGREGATIONS), ("kl_kind", KL_ESTIMATORS), ("advantage_scale", ADVANTAGE_SCALINGS)],
)
def test_variant_fields_accept_exactly_their_registry(field, registry):
    assert typing.get_args(typing.get_type_hints(GRPOConfig)[field]) == tuple(registry)
    for name in registry:
        assert getattr(build_config(GRPOConfig, {field: name}, section="grpo"), field) == name
    with pytest.raises(ConfigError, match=f"grpo.{field} must be one of"):
        build_config(GRPOConfig, {field: "no-such-variant"}, section="grpo")


def test_optional_bool_and_string_fields():
    run = build_config(RunConfig, {"out": "none", "seed": "7", "compile": "yes", "dtype": "float32"})
    assert run == RunConfig(out=None, seed=7, compile=True, dtype="float32")
    assert build_config(RunConfig, {"out": "runs/a", "seed": "null"}) == RunConfig(out="runs/a")


def test_invalid_or_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_sections(SECTIONS, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_sections(SECTIONS, write(tmp_path, "[grpo\nlr = 1"))


def test_to_toml_round_trips_through_load_sections(tmp_path):
    configs = {
        "grpo": dataclasses.replace(
            GRPOConfig(), lr=3e-7, clip_high=0.28, lr_schedule="cosine", max_new_tokens=64
        ),
        "sft": dataclasses.replace(SFTConfig(), min_lr_ratio=0.0, total_steps=7),
        "run": RunConfig(model='C:\\models\\"q"', out=None, seed=0, compile=True),
    }
    text = to_toml(configs)
    assert "out =" not in text  # None is left out: TOML has no null, and the default restores it
    loaded = load_sections({"grpo": GRPOConfig, "sft": SFTConfig, "run": RunConfig}, write(tmp_path, text))
    assert loaded == configs


def test_a_table_valued_field_takes_entries_or_a_whole_table_from_overrides(tmp_path):
    """`reward.options.clip=5` adds one entry typed as TOML types it; `reward.options={...}` replaces the table
    (`{}` empties it); anything else is an error, not a string stored where a table belongs."""
    from pipeline.config import RewardConfig

    path = tmp_path / "c.toml"
    path.write_text('[reward]\nname = "ehull"\noptions = { clip = 5.0, overlap_slope = 5.0 }\n')
    sections = {"reward": RewardConfig}
    added = load_sections(sections, path, ["reward.options.penalty=-10", "reward.options.rule=none"])[
        "reward"
    ]
    assert added.options == {"clip": 5.0, "overlap_slope": 5.0, "penalty": -10, "rule": "none"}
    replaced = load_sections(sections, path, ["reward.options={ clip = 2 }"])["reward"]
    assert replaced.options == {"clip": 2}
    assert load_sections(sections, path, ["reward.options={}"])["reward"].options == {}
    with pytest.raises(ConfigError, match=r"reward.options expects a table"):
        load_sections(sections, path, ["reward.options=5"])


def test_a_reward_named_on_the_command_line_drops_the_files_reward_options():
    """The demo preset's options belong to its ehull reward: `demo --reward chgnet-etot+species` must not hand
    them to a reward that takes none of them (and `--set reward.options.KEY` still adds to the new one)."""
    from cli import configs_with
    from pipeline.config import preset_path
    from pipeline.demo import DEMO_SECTIONS

    preset = preset_path("demo")
    assert configs_with(DEMO_SECTIONS, preset, None)["reward"].options  # the preset has some
    named = configs_with(DEMO_SECTIONS, preset, None, reward__name="chgnet-etot+species")["reward"]
    assert (named.name, named.options) == ("chgnet-etot+species", {})
    kept = configs_with(DEMO_SECTIONS, preset, ["reward.options.overlap=-1"], reward__name="ehull")["reward"]
    assert kept.options == {"overlap": -1}


def test_a_field_added_after_a_run_was_written_counts_as_changed_only_off_its_default():
    """An old run directory's config.toml lacks the fields added since; at their defaults that run ran as the
    default does, so resuming it is not a change of settings."""
    import tomllib

    configs = {"run": RunConfig(model="small"), "grpo": GRPOConfig(lr=1e-4)}
    saved = tomllib.loads(to_toml(configs))
    assert config_differences(saved, configs) == []
    del saved["grpo"]["kl_coef"], saved["run"]["compile"]  # fields the old run did not have
    assert config_differences(saved, configs) == []
    configs["grpo"].kl_coef = 0.5
    assert config_differences(saved, configs) == ["grpo.kl_coef"]
    del saved["grpo"]["lr"]  # lr is not at its default: the old run cannot be said to have used it
    assert config_differences(saved, configs) == ["grpo.kl_coef", "grpo.lr"]
    saved["grpo"]["removed_field"] = 1  # a key the current configs no longer have still differs
    assert "grpo.removed_field" in config_differences(saved, configs)
