"""python -m lowmem.generate: a run directory's newest good checkpoint continues a prompt."""
from lowmem import generate
from lowmem.train.trainer import Trainer


def test_a_run_directory_continues_a_prompt_greedily_and_reproducibly(tmp_path, corpus, make_config, capsys):
    config = make_config(tmp_path, corpus)
    Trainer(config).fit()
    capsys.readouterr()
    assert generate.main([str(config.run_dir), "def", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[-1]
    assert first.startswith("def") and len(first) > len("def")
    assert "step_00000012" in out and "Loading weights" not in err  # the newest checkpoint, no library bar
    assert generate.main([str(config.run_dir), "def", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == first  # greedy: the same text again


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert generate.main([str(tmp_path / "nothing"), "x"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"checkpoint directory '{tmp_path / 'nothing'}' not found")
