"""lowmem.console: info lines on rank 0 only, warnings on every rank, to the streams of the moment."""
from lowmem import console
from lowmem.console import log


def test_rank_zero_prints_info_to_stdout_and_warnings_to_stderr(capsys):
    console.configure(is_main=True)
    log.info("step 1")
    log.warning("warning: careful")
    out, err = capsys.readouterr()
    assert out == "step 1\n" and err == "warning: careful\n"


def test_other_ranks_print_only_warnings_and_errors(capsys):
    try:
        console.configure(is_main=False)
        log.info("step 1")
        log.warning("warning: careful")
        log.error("rank 1 failed: boom")
        out, err = capsys.readouterr()
        assert out == "" and err == "warning: careful\nrank 1 failed: boom\n"
    finally:
        console.configure(is_main=True)


def test_configuring_twice_does_not_print_twice(capsys):
    console.configure()
    console.configure()
    log.info("once")
    assert capsys.readouterr().out == "once\n"
