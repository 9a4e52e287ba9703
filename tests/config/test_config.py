import re
from pathlib import Path

import pytest
import yaml

from lowmem.errors import ConfigError
from lowmem.model.build import build_meta_model
from lowmem.optim.groups import check_options_against_model
from lowmem.train.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_validates(path, request, monkeypatch):
    if path.name.startswith("finetune_") or "finetune" in path.parts:  # they read ./tiny_finetune by default
        monkeypatch.chdir(request.getfixturevalue("tiny_finetune")["llama"].parent)
        link = Path.cwd() / "tiny_finetune"
        if not link.exists():
            link.symlink_to(Path.cwd() / "llama")
    if "studies" in path.parts:
        from lowmem.study import load_study

        _, configs = load_study(path)
    elif "optimizers" in path.parts:  # a fragment is merged after a full config, as its comment shows
        configs = {path.name: load_config([path.parents[1] / "c4_pretrain.yaml", path])}
    else:
        configs = {path.name: load_config(path)}
    for config in configs.values():
        check_against_model_shapes(config)


def check_against_model_shapes(config):
    if config.model.pretrained is None:  # shapes are known offline: check optimizer values against them
        meta = build_meta_model(config.model, config.model.vocab_size or 32000)
        check_options_against_model(meta, config.optimizer)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "c4_pretrain.yaml", "finetune.yaml"} <= names
    assert {f"llama_{s}.yaml" for s in ("9m", "20m", "35m", "60m", "130m", "350m", "1b", "7b")} <= names


def test_include_merges_and_overrides_win(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"batch_size": 4, "max_steps": 7}, "tokenizer": {"name": "t5-base"}})
    child = write(tmp_path / "child.yaml", {"include": "base.yaml", "train": {"max_steps": 9}})
    config = load_config(child, ["train.batch_size=2", "optimizer.lr=0.02", "model.preset=llama_20m"])
    assert config.train.batch_size == 2
    assert config.train.max_steps == 9
    assert config.optimizer.lr == pytest.approx(0.02)
    assert config.model.preset == "llama_20m"


@pytest.mark.parametrize("override, message", [
    (["train.bach_size=4"], "unknown key 'train.bach_size' (did you mean 'batch_size'?)"),
    (["trian.batch_size=4"], "unknown key 'trian' (did you mean 'train'?)"),
    (["optimizer.name=adamm"], "unknown optimizer 'adamm' (did you mean 'adamw'?)"),
    (["optimizer.lrr=0.1"], "unknown key 'optimizer.lrr' (did you mean 'lr'?)"),
    (["model.preset=llama_60"], "unknown preset 'llama_60' (did you mean 'llama_60m'?)"),
    (["train.precision=bf61"], "train.precision: 'bf61' is not one of"),
    (["train.schedule=cosin"], "unknown schedule 'cosin' (did you mean 'cosine'?)"),
    (["data.source=hubb"], "data.source: 'hubb' is not one of ['embedded', 'hub', 'files', 'prepared'] "
                           "(did you mean 'hub'?)"),
    (["data.instruct.format=chatt"], "data.instruct.format: 'chatt' is not one of ['prompt_response', 'chat'] "
                                     "(did you mean 'chat'?)"),
])
def test_misspelled_keys_and_names_suggest_the_closest(tmp_path, override, message):
    base = write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"}})
    with pytest.raises(ConfigError) as err:
        load_config(base, override)
    assert message in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=-0.001", "optimizer.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=two", "train.batch_size"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("data.seq_len=0", "data.seq_len"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas[1]"),
])
def test_impossible_values_name_the_key(tmp_path, override, key):
    base = write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"}})
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(base, [override])


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=.inf", "optimizer.lr"),
    ("optimizer.lr=-.inf", "optimizer.lr"),
    ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
    ("optimizer.eps=nan", "optimizer.eps"),
    ("optimizer.betas=[0.9, .nan]", "optimizer.betas[1]"),
    ("optimizer.scale=.inf", "optimizer.scale"),  # an option of the projection optimizers only
    ("train.min_lr_ratio=.nan", "train.min_lr_ratio"),
    ("data.eval_fraction=.nan", "data.eval_fraction"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, override, key):
    base = write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"}})
    overrides = ["optimizer.name=galore", override] if override.startswith("optimizer.scale") else [override]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be a finite number"):
        load_config(base, overrides)


def test_a_pretrained_model_brings_its_own_tokenizer_and_refuses_a_fresh_bpe(tmp_path):
    base = write(tmp_path / "c.yaml", {"model": {"pretrained": "some/model"}})
    assert load_config(base).tokenizer.name == "some/model"
    assert load_config(base, ["tokenizer.name=other/tokenizer"]).tokenizer.name == "other/tokenizer"
    with pytest.raises(ConfigError, match=r"tokenizer.train_bpe: .* set tokenizer.train_bpe=null"):
        load_config(base, ["tokenizer.train_bpe={vocab_size: 4096}"])
    with pytest.raises(ConfigError, match=r"^model.vocab_size: a pretrained model .* \(model.vocab_size=null\)"):
        load_config(base, ["model.vocab_size=4096"])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")
    base = write(tmp_path / "c.yaml", {"include": "missing_base.yaml"})
    with pytest.raises(ConfigError, match="missing_base.yaml"):
        load_config(base)
    base = write(tmp_path / "d.yaml", {"tokenizer": {"name": "t5-base"},
                                       "data": {"source": "files", "files": [str(tmp_path / "no_*.txt")]}})
    with pytest.raises(ConfigError, match="no_\\*.txt"):
        load_config(base)
    base = write(tmp_path / "e.yaml", {"tokenizer": {"name": "t5-base"}, "checkpoint": {"resume": str(tmp_path / "ck")}})
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(base)


def test_update_in_backward_refuses_global_clipping(tmp_path):
    base = write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"}})
    with pytest.raises(ConfigError, match="grad_clip"):
        load_config(base, ["optimizer.update_in_backward=true", "train.grad_clip=1.0"])
    assert load_config(base, ["optimizer.update_in_backward=true", "train.grad_clip=0"]).optimizer.update_in_backward


def test_unknown_llama_field_is_rejected_with_suggestion(tmp_path):
    from lowmem.model.build import llama_config

    config = load_config(write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"},
                                                      "model": {"extra": {"rms_norm_epss": 1e-5}}}))
    with pytest.raises(ConfigError, match="model.extra.rms_norm_epss.*rms_norm_eps"):
        llama_config(config.model, 100)


def test_several_files_merge_in_order(tmp_path):
    base = write(tmp_path / "base.yaml", {"optimizer": {"name": "adamw", "lr": 0.001}, "train": {"max_steps": 5}})
    galore = Path(__file__).resolve().parents[2] / "configs" / "optimizers" / "galore.yaml"
    config = load_config([base, galore], ["optimizer.rank=64"])
    assert config.optimizer.name == "galore" and config.optimizer.lr == 0.01 and config.optimizer.rank == 64
    assert config.train.max_steps == 5


def test_rank_larger_than_a_weight_fails_before_training(tmp_path, capsys):
    from lowmem.cli import main

    path = write(tmp_path / "c.yaml", {"model": {"preset": "llama_9m"}, "optimizer": {"name": "galore", "rank": 129},
                                       "data": {"max_docs": 5}, "run": {"out_dir": str(tmp_path / "runs")}})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "optimizer.rank: 129 exceeds the smaller side of model.layers.0.self_attn.q_proj.weight" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=1e-3", None),  # YAML 1.1 reads this as a string; it is a number
    ("train.max_tokens=1e6", None),
    ("train.eval_batch_size=-1", "train.eval_batch_size: must be at least 1"),
    ("train.device=cdua", "train.device: unknown device 'cdua'"),
    ("data.eval_split=validation", "data.eval_split: only hub datasets have named splits"),
    ("data.max_docs=0", "data.max_docs: must be at least 1"),
    ("data.files=[a.txt]", "data.files: set, but data.source is 'embedded'"),
    ("data.streaming=true", "data.streaming: only hub and files sources stream"),
])
def test_value_checks(tmp_path, override, message):
    base = write(tmp_path / "c.yaml", {"tokenizer": {"name": "t5-base"}})
    if message is None:
        config = load_config(base, [override])
        assert config.optimizer.lr == 1e-3 or config.train.max_tokens == 1_000_000
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(base, [override])


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    base = write(tmp_path / "c.yaml", {"checkpoint": {"resume": str(tmp_path / "ck")}})
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        load_config(base)


def test_a_key_an_older_config_lacks_is_no_change_while_it_holds_its_default():
    from lowmem.config.schema import to_dict
    from lowmem.train.config import Config, config_changes

    current = to_dict(Config())
    older = to_dict(Config())
    del older["train"]["precision"]  # as written before the key existed
    assert config_changes(older, current) == []
    current["train"]["precision"] = "bf16"
    assert config_changes(older, current) == ["train.precision"]
    older["train"]["precision"] = "fp32"
    current["run"]["seed"] = older["run"]["seed"] + 1
    assert config_changes(older, current) == ["run.seed", "train.precision"]


ROOT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
def test_spam_configs_say_which_post_reset_warmup_they_follow():
    readme = load_config([ROOT_CONFIGS / "c4_pretrain.yaml", ROOT_CONFIGS / "optimizers/spam.yaml"])
    script = load_config([ROOT_CONFIGS / "c4_pretrain.yaml", ROOT_CONFIGS / "optimizers/spam_script.yaml"])
    assert readme.optimizer.reset_warmup == 150  # SPAM's README
    assert script.optimizer.reset_warmup == script.train.warmup_steps == 1000  # its launch script
    assert dataclasses_differences(readme.optimizer, script.optimizer) == {"reset_warmup"}


def dataclasses_differences(a, b) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


def test_lora_under_the_optimizer_is_refused_naming_model_lora():
    with pytest.raises(ConfigError, match=r"optimizer\.lora: .*model\.lora"):
        load_config(None, ["optimizer.lora.r=8"])
    config = load_config(None, ["model.lora.r=4"])
    assert config.model.lora.r == 4 and not hasattr(config.optimizer, "lora")
    with pytest.raises(ConfigError, match=r"model\.lora\.r: must be at least 1"):
        load_config(None, ["model.lora.r=0"])


def test_switching_the_optimizer_on_the_command_line_takes_its_preset_lr(capsys):
    assert load_config("configs/quickstart.yaml", ["optimizer.name=galore"]).optimizer.lr == 0.01
    assert "0.003 was set for adamw; galore trains at its own preset lr" in capsys.readouterr().out
    assert load_config("configs/quickstart.yaml", ["optimizer.name=galore", "optimizer.lr=0.02"]).optimizer.lr == 0.02
    assert load_config("configs/quickstart.yaml", []).optimizer.lr == 0.003


def test_a_key_of_another_optimizer_names_the_optimizers_that_read_it():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.rnak' \(did you mean 'rank'\?\)"):
        load_config("configs/quickstart.yaml", ["optimizer.rnak=4"])  # adamw has no rank, galore has
    with pytest.raises(ConfigError, match=r"optimizer.rank: not an option of 'adamw'; fira, galore, osd read it"):
        load_config("configs/quickstart.yaml", ["optimizer.rank=4"])


def test_a_warmup_as_long_as_the_run_is_warned_about(capsys):
    load_config("configs/quickstart.yaml", ["train.warmup_steps=300", "train.max_steps=300"])
    assert "warning: train.warmup_steps 300 >= train.max_steps 300" in capsys.readouterr().err
