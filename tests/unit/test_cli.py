import pytest

from agent.cli.main import EXIT_USAGE, main


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["status", "--jsn"], ["--config"],
                                  ["audit", "--limit", "0"], ["audit", "--limit", "many"],
                                  ["renew", "--wiat"], ["decommission", "--yes", "now"]])
def test_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_bad_config_is_a_clear_failure(tmp_path, capsys):
    cfg = tmp_path / "a.toml"
    cfg.write_text("[tpm]\ntcti = 1\n")
    assert main(["--config", str(cfg), "status"]) == 2
    err = capsys.readouterr().err
    assert "[tpm] tcti" in err and "Traceback" not in err
