"""The run scaffold (`jaxvision.train.run`): atomic exports, process-0 logging.

The trainers' own behaviour on top of it (the max_steps guard, their export paths) is tested with
each trainer; here the export's atomicity is proven against a real kill (SIGKILL, no cleanup code
runs) in the middle of writing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxvision.train import run as run_lib


def _write(folder: Path, step: int, files: int = 3) -> None:
    for i in range(files):
        (folder / f"part_{i}.txt").write_text(f"step {step}\n")


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_atomic_directory_replaces_the_old_folder_whole(tmp_path):
    target = tmp_path / "export"
    with run_lib.atomic_directory(target) as tmp:
        assert tmp != target and not target.exists()
        _write(tmp, 1)
    assert _contents(target) == {f"part_{i}.txt": "step 1\n" for i in range(3)}
    with run_lib.atomic_directory(target) as tmp:
        _write(tmp, 2, files=2)  # the new export replaces the old one whole: no stale part_2
    assert _contents(target) == {f"part_{i}.txt": "step 2\n" for i in range(2)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind


def test_a_crash_while_writing_keeps_the_old_export(tmp_path):
    target = tmp_path / "export"
    with run_lib.atomic_directory(target) as tmp:
        _write(tmp, 1)
    with pytest.raises(RuntimeError, match="disk full"), run_lib.atomic_directory(target) as tmp:
        _write(tmp, 2, files=1)
        raise RuntimeError("disk full")
    assert _contents(target) == {f"part_{i}.txt": "step 1\n" for i in range(3)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from jaxvision.train.run import atomic_directory

    target, kill_after = Path(sys.argv[1]), int(sys.argv[2])
    with atomic_directory(target) as tmp:
        for i in range(3):
            if i == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: a real kill
            (tmp / f"part_{i}.txt").write_text("step 2\\n")
            time.sleep(0.01)
    if kill_after == 3:  # killed after the new folder is complete, before anything else
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("kill_after", [0, 1, 2, 3])
def test_a_kill_midway_leaves_the_old_export_or_the_new_one_never_a_mix(tmp_path, kill_after):
    """A writer process is SIGKILLed after writing 0, 1, 2 or all 3 files of a new export over an
    old one: `export/` then holds exactly the old files (or, killed after completion, exactly the
    new ones); never a mix of the two steps, never a partial folder."""
    target = tmp_path / "export"
    target.mkdir()
    _write(target, 1)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(kill_after)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    old = {f"part_{i}.txt": "step 1\n" for i in range(3)}
    new = {f"part_{i}.txt": "step 2\n" for i in range(3)}
    assert _contents(target) == (new if kill_after == 3 else old)
    # The next export cleans up what the killed one left.
    with run_lib.atomic_directory(target) as tmp:
        _write(tmp, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_log_prints_on_process_zero_only(capsys, monkeypatch):
    run_lib.log("hello")
    assert capsys.readouterr().err == "hello\n"
    monkeypatch.setattr(run_lib.jax, "process_index", lambda: 1)
    run_lib.log("hello")
    assert capsys.readouterr().err == ""
