"""Artifact versions: immutable, verified on load, an atomic pointer, changes recorded."""

import os

import pytest
from tiny import tiny_llama

from loramix import MixtureModel
from loramix.versions import ArtifactError, current, listing, numbers, path_of, publish, resolve, verify


@pytest.fixture()
def staged(adapters, tmp_path):
    """Two staged mixtures: the three test experts, then the same with `sort` replaced."""
    one = tmp_path / "stage1"
    MixtureModel.from_adapters(tiny_llama(0), adapters, router="moa").save_pretrained(one, base_path="base")
    swapped = dict(adapters, sort=adapters["reverse"])
    two = tmp_path / "stage2"
    MixtureModel.from_adapters(tiny_llama(0), swapped, router="moa").save_pretrained(two, base_path="base")
    return one, two


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_versions_are_immutable_and_the_pointer_moves_atomically(staged, tmp_path):
    out = tmp_path / "run"
    first = publish(out, staged[0], extra={"serve.json": {"topology": "fused"}}, scores={"exact_match": 0.9})
    assert (first, current(out), numbers(out)) == (1, 1, [1])
    v1 = snapshot(path_of(out, 1))
    assert publish(out, staged[0], extra={"serve.json": {"topology": "fused"}}) == 1  # identical: no new version
    second = publish(out, staged[1], note="replaced sort")
    assert (second, current(out)) == (2, 2) and os.readlink(out / "artifact") == "artifacts/v2"
    assert snapshot(path_of(out, 1)) == v1  # a new version never touches an old one's bytes
    rows = listing(out)
    assert [r["version"] for r in rows] == [1, 2] and rows[1]["parent"] == 1 and rows[1]["current"]
    changes = {"experts_added": [], "experts_removed": [], "experts_replaced": ["sort"], "router_retrained": False}
    assert rows[1]["changes"] == changes  # both routers are untrained (zero): the same bytes
    assert rows[0]["exact_match"] == 0.9
    assert resolve(out) == path_of(out, 2).resolve() and resolve(out, 1) == path_of(out, 1).resolve()
    assert not [p for p in (out / "artifacts").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_a_changed_or_truncated_file_is_refused_by_name(staged, tmp_path):
    out = tmp_path / "run"
    publish(out, staged[0])
    version = path_of(out, 1)
    verify(version)
    weights = version / "experts" / "sort" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"adapter_model.safetensors' does not match the artifact's manifest"):
        MixtureModel.from_pretrained(version, base_model=tiny_llama(0))
    weights.unlink()
    with pytest.raises(ArtifactError, match="is missing from the artifact"):
        verify(version)


def test_a_pre_versions_artifact_folder_is_kept_aside(staged, tmp_path):
    out = tmp_path / "run"
    (out / "artifact").mkdir(parents=True)
    (out / "artifact" / "manifest.json").write_text("{}")
    publish(out, staged[0])
    assert (out / "artifact").is_symlink()
    assert [p.name.startswith("legacy-") for p in (out / "artifacts").iterdir()].count(True) == 1
    with pytest.raises(ArtifactError, match="has no version 7 .it has v1."):
        path_of(out, 7)


def test_expert_commands_check_their_flags_before_anything_runs(tmp_path, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse: a LoRA is what add-expert brings
        main(["add-expert", str(tmp_path), "--name", "x", "--train", "t.jsonl", "--eval", "e.jsonl"])
    assert exit_.value.code == 2 and "--adapter" in capsys.readouterr().err
    assert main(["replace-expert", str(tmp_path), "--name", "x"]) == 2
    assert "needs `--train` (retrain on these rows) or `--adapter`" in capsys.readouterr().err
    assert main(["remove-expert", str(tmp_path), "--name", "x"]) == 2
    assert "holds no finished run" in capsys.readouterr().err


def test_serve_update_refuses_a_missing_or_damaged_version_before_touching_the_cluster(
    staged, tmp_path, capsys, monkeypatch
):
    """`loramix serve-update` checks the target version on disk (exists, every file whole) and that
    a cluster was named, before it connects to anything."""
    from pipelines.cli import main

    out = tmp_path / "run"
    publish(out, staged[0])
    assert main(["serve-update", str(out), "--version", "3"]) == 2
    assert "has no version 3 (it has v1)" in capsys.readouterr().err
    (path_of(out, 1) / "router" / "router.safetensors").write_bytes(b"")
    assert main(["serve-update", str(out), "--version", "1"]) == 2
    assert "router.safetensors' does not match the artifact's manifest" in capsys.readouterr().err
    publish(out, staged[1])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve-update", str(out), "--version", "2"]) == 2
    assert "pass --address or set RAY_ADDRESS" in capsys.readouterr().err
