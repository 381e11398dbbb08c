"""`neurohybrid run`'s option handling (the interruption behaviour is tests/workflow/test_resume.py)."""

from pathlib import Path

from neurohybrid.runner import REPO_PROFILE, _profile, _workdir


def test_profile_sits_beside_the_snakefile_unless_one_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _profile(["--cores", "2"]) == ["--workflow-profile", str(tmp_path / REPO_PROFILE)]
    repo = tmp_path / "repo"
    assert _profile(["--snakefile", str(repo / "Snakefile")]) == ["--workflow-profile", str(repo / REPO_PROFILE)]
    assert _profile(["-s", str(repo / "Snakefile")]) == ["--workflow-profile", str(repo / REPO_PROFILE)]
    assert _profile(["--profile", "profiles/slurm"]) == []
    assert _profile(["--workflow-profile=elsewhere"]) == []


def test_workdir_follows_the_directory_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _workdir([]) == Path.cwd()
    assert _workdir(["--directory", "w"]) == Path("w")
    assert _workdir(["-d", "w2"]) == Path("w2")
    assert _workdir(["--directory=w3"]) == Path("w3")
