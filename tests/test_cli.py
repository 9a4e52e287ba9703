"""train.py's command line says what it can do: --help, --list-optimizers, --print-config, --dry-run, and a flag it
does not take answered with the dotted override to write instead."""
import yaml

from lowmem import cli
from lowmem.optim import OPTIMIZERS


def test_help_lists_the_sections_the_optimizers_and_examples(capsys):
    help_text = cli.parser().format_help()
    assert "config sections: run, model, tokenizer, data, optimizer, train, checkpoint, log, distributed" in help_text
    assert all(name in help_text for name in OPTIMIZERS) and "examples:" in help_text
    assert "--dry-run" in help_text and "--print-config" in help_text and "--list-optimizers" in help_text


def test_list_optimizers_names_each_with_its_lr_and_parts(capsys):
    assert cli.main(["--list-optimizers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(OPTIMIZERS)
    galore = next(line for line in lines if line.startswith("galore "))
    assert "lr 0.01" in galore and "projector svd" in galore and "residual drop" in galore


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    assert cli.main(["configs/quickstart.yaml", f"run.out_dir={tmp_path}", "optimizer.name=galore",
                     "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimizer"]["name"] == "galore" and printed["optimizer"]["lr"] == 0.01  # galore's own lr
    assert printed["tokenizer"]["train_bpe"]["vocab_size"] > 0  # resolved defaults are shown
    assert not any(tmp_path.iterdir())


def test_dry_run_prints_the_header_data_and_plan_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["configs/quickstart.yaml", f"run.out_dir={tmp_path}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: llama_9m, 1.85M parameters")
    assert "data.source 'embedded'" in out and "assumptions: llama_9m" in out and "total" in out
    assert not any(tmp_path.iterdir())


def test_a_flag_train_py_does_not_take_gets_the_override_to_write(capsys):
    assert cli.main(["configs/quickstart.yaml", "--max_steps", "10"]) == 2
    assert "did you mean train.max_steps=10?" in capsys.readouterr().err
    assert cli.main(["configs/quickstart.yaml", "--warmup-steps=5"]) == 2
    assert "did you mean train.warmup_steps=5?" in capsys.readouterr().err
