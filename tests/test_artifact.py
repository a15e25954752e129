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
