"""Stage caching primitives: content digests, fingerprints, markers; atomic writes."""

import pytest

from loramix.artifact import StageStore, atomic_dir, file_digest, fingerprint, read_json, write_json
from loramix.config import build_config


def test_file_digest_follows_content_not_mtime(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    d1 = file_digest(f)
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    assert file_digest(f) == d1
    f.write_text('{"prompt": "a", "completion": "c"}\n')
    assert file_digest(f) != d1
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "x.arrow").write_bytes(b"1")
    d2 = file_digest(tmp_path / "ds")
    (tmp_path / "ds" / "y.arrow").write_bytes(b"2")
    assert file_digest(tmp_path / "ds") != d2
    assert file_digest(None) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        file_digest(tmp_path / "nope")


def test_fingerprint_sees_config_changes_only():
    a, b = build_config({}), build_config({})
    assert fingerprint("expert", a.expert) == fingerprint("expert", b.expert)
    assert fingerprint("expert", a.expert) != fingerprint("expert", build_config({}, ["expert.rank=16"]).expert)
    assert fingerprint("expert", a.expert) == fingerprint("expert", build_config({}, ["router.top_k=1"]).expert)


def test_stage_store_skips_only_matching_hash(tmp_path):
    store = StageStore(tmp_path)
    assert store.done("expert/a", "h1") is None
    store.mark("expert/a", "h1", {"path": "x"})
    assert store.done("expert/a", "h1") == {"path": "x"}
    assert store.done("expert/a", "h2") is None  # inputs changed: rerun
    assert (tmp_path / "stages" / "expert__a.json").is_file()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "art"
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (target / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temp dirs left behind
    write_json(tmp_path / "j.json", {"a": 1})
    assert read_json(tmp_path / "j.json") == {"a": 1}


def test_file_digest_cannot_be_fooled_by_moving_bytes_between_names_and_contents(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a").write_bytes(b"bc")
    (two / "ab").write_bytes(b"c")  # the old digest hashed "a" + "bc" and "ab" + "c" alike
    assert file_digest(one) != file_digest(two)


def test_marker_vouches_only_for_the_outputs_it_saw(tmp_path):
    """A crash after a rerun rewrote a stage's outputs but before its marker was updated must not
    leave the old marker vouching for new bytes."""
    out = tmp_path / "experts" / "a"
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"old")
    store = StageStore(tmp_path)
    store.mark("expert/a", "h1", {"path": str(out)}, outputs=[str(out)])
    assert store.done("expert/a", "h1") == {"path": str(out)}
    (out / "adapter_model.safetensors").write_bytes(b"new")  # rewritten by a run of another config
    assert store.done("expert/a", "h1") is None
    store.mark("expert/a", "h1", {"path": str(out)}, outputs=[str(out)])
    store.invalidate("expert/a")  # what a runner does before a stage rewrites its outputs
    assert store.done("expert/a", "h1") is None


def test_output_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from loramix.lock import LOCK, LockedError, output_lock

    with output_lock(tmp_path, "first"):
        with output_lock(tmp_path):  # the same process again (add-domain runs a run): fine
            pass
        assert (tmp_path / LOCK).is_file()
    assert not (tmp_path / LOCK).exists()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "command": "x"}))
        with pytest.raises(LockedError, match=rf"in use by pid {other.pid} .* Wait for it to finish"):
            with output_lock(tmp_path):
                pass
    finally:
        other.kill()
        other.wait()
    with output_lock(tmp_path):  # its holder died: taken over
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
