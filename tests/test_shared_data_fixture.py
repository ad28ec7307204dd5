"""The ``nusax_dir`` fixture's rule (tests/tiny.py ``require_nusax``): absent data skips a test with the reason
outside CI, and fails it in CI (CI=true), naming the path."""
import pytest

from tiny import require_nusax


def outcome(root):
    """What require_nusax(root) did: ("returned", value) or (exception type, message). Skip and fail are caught
    here (as BaseException), so a skip where a failure is due fails this test instead of skipping it."""
    try:
        return "returned", require_nusax(root)
    except BaseException as e:  # pytest's Skipped and Failed are BaseExceptions
        return type(e), str(e)


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_absent_data_fails_in_ci_naming_the_path(tmp_path, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    kind, msg = outcome(tmp_path / "nusax")
    assert kind is pytest.fail.Exception, (kind, msg)
    assert str(tmp_path / "nusax") in msg and "not found" in msg and "CI=true" in msg


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_absent_data_skips_with_the_reason_outside_ci(tmp_path, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    (tmp_path / "nusax").mkdir()  # a folder without sentiment/ is not the data
    kind, msg = outcome(tmp_path / "nusax")
    assert kind is pytest.skip.Exception, (kind, msg)
    assert str(tmp_path / "nusax") in msg and "sentiment" in msg and "shared/" in msg


@pytest.mark.parametrize("ci", [None, "true"])
def test_present_data_is_returned(tmp_path, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    (tmp_path / "nusax" / "sentiment").mkdir(parents=True)
    assert outcome(tmp_path / "nusax") == ("returned", tmp_path / "nusax")
