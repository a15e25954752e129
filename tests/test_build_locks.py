"""A torch extension build lock left by a killed worker must not hang every later DeepSpeed start."""

import os
import time

from actors.lora_worker import clear_stale_build_locks


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm", tmp_path / "other_op"  # torch: TORCH_EXTENSIONS_DIR/<op>
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "build.ninja").write_text("rule cxx")
        (folder / "lock").touch()
    hour_ago = time.time() - 3600
    for f in stale.iterdir():  # a build killed an hour ago: nothing touched its folder since
        os.utime(f, (hour_ago, hour_ago))
    assert clear_stale_build_locks(max_idle_s=300) == [stale / "lock"]
    assert not (stale / "lock").exists() and (live / "lock").exists()  # a build under way keeps its lock
