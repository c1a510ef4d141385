"""The image's entrypoint (deploy/entrypoint.py): started as root, it hands the root-owned data
volume to the unprivileged user and runs the command as that user, never as root."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parents[1] / "deploy" / "entrypoint.py"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root, as the container starts")
def test_root_hands_the_volume_over_and_drops_privileges(tmp_path):
    user = pwd.getpwnam("nobody")  # stands in for the image's `shim` user
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 0, 0)  # as platforms mount volumes
    out = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "sh", "-c", "echo $(id -u) $(id -g) groups: $(id -G)"],
        env={**os.environ, "SHIM_USER": "nobody", "SHIM_DATA_DIR": str(data)}, capture_output=True, text=True,
        timeout=30, cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(user.pw_uid), str(user.pw_gid), "groups:", str(user.pw_gid)]  # root's groups gone
    assert data.stat().st_uid == user.pw_uid


def test_a_non_root_start_just_runs_the_command(tmp_path):
    if os.getuid() == 0:
        pytest.skip("root takes the other path")
    out = subprocess.run([sys.executable, str(ENTRYPOINT), sys.executable, "-c", "print('ran')"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "ran\n"
