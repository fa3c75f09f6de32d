"""scripts/make_env.py: the development .env that `make run` writes."""

import importlib.util
import shutil
import stat

import pytest

from tests.servers import PROJECT_ROOT


@pytest.fixture
def make_env(tmp_path, monkeypatch):
    """Load the script as a module whose project root is an empty directory."""
    spec = importlib.util.spec_from_file_location(
        "make_env", PROJECT_ROOT / "scripts" / "make_env.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copy(PROJECT_ROOT / ".env.example", tmp_path / ".env.example")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    return module


def test_env_file_is_private(make_env, tmp_path):
    # Group and others would otherwise read the secret key, and the upstream
    # key that the operator adds later.
    assert make_env.main() == 0

    mode = stat.S_IMODE((tmp_path / ".env").stat().st_mode)
    assert mode & 0o077 == 0


def test_env_file_has_new_secret_and_debug(make_env, tmp_path):
    make_env.main()

    lines = (tmp_path / ".env").read_text().splitlines()
    assert "DEBUG=on" in lines
    secret_lines = [line for line in lines if line.startswith("SECRET_KEY=")]
    assert len(secret_lines) == 1
    assert len(secret_lines[0]) > len("SECRET_KEY=") + 40


def test_existing_env_file_is_kept(make_env, tmp_path):
    (tmp_path / ".env").write_text("DEBUG=off\n")

    assert make_env.main() == 0

    assert (tmp_path / ".env").read_text() == "DEBUG=off\n"
